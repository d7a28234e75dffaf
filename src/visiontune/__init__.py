"""visiontune: transfer-learning image classification that is fast on a CPU.

The verbs live in `visiontune.api` (one function per CLI verb); the ones whose names are not subpackages are here
too. Serving is `from visiontune.serve import serve` (FastAPI and uvicorn load only for serving).
"""

from visiontune.api import bench, compare, distill, doctor, ensemble, evaluate, predict, predict_shards, scan, split, track, train
from visiontune.data.index import load_dataset
from visiontune.version import __version__


def __getattr__(name: str):
    # Classifier pulls in torch and ONNX Runtime; `import visiontune` (and so `visiontune scan`) should not.
    if name in ("Classifier", "Prediction"):
        from visiontune import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'visiontune' has no attribute {name!r}")


__all__ = ["__version__", "Classifier", "Prediction", "bench", "compare", "distill", "doctor", "ensemble", "evaluate",
           "load_dataset", "predict", "predict_shards", "scan", "split", "track", "train"]
