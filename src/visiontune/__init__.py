"""visiontune: transfer-learning image classification that is fast on a CPU."""

__version__ = "0.1.0"

from visiontune.api import compare, evaluate, scan, split, train  # noqa: E402
from visiontune.data.index import load_dataset  # noqa: E402
from visiontune.api import bench, distill, predict  # noqa: E402
# The subpackages, callable as the API verbs of the same name (see _verb_package.py).
from visiontune import ensemble, explain, export  # noqa: E402


def __getattr__(name: str):
    # Classifier pulls in torch and ONNX Runtime; `import visiontune` (and so `visiontune scan`) should not.
    if name in ("Classifier", "Prediction"):
        from visiontune import inference

        return getattr(inference, name)
    if name == "serve":  # FastAPI and uvicorn load only for serving (a callable package, like `explain`)
        import visiontune.serve

        return visiontune.serve
    raise AttributeError(f"module 'visiontune' has no attribute {name!r}")


__all__ = ["__version__", "Classifier", "Prediction", "bench", "compare", "distill", "ensemble", "evaluate", "explain",
           "export", "load_dataset", "predict", "scan", "serve", "split", "train"]
