"""visiontune: transfer-learning image classification that is fast on a CPU."""

__version__ = "0.1.0"

from visiontune.api import scan, split, train  # noqa: E402
from visiontune.data.index import load_dataset  # noqa: E402

__all__ = ["__version__", "load_dataset", "scan", "split", "train"]
