"""Data layer: index a dataset, check its files, split it, decode and preprocess images."""

from visiontune.data.decode import decode, decode_full
from visiontune.data.index import SPLITS, Dataset, load_dataset
from visiontune.data.integrity import ScanReport, scan_dataset
from visiontune.data.split import Split, split_dataset

__all__ = ["SPLITS", "Dataset", "ScanReport", "Split", "decode", "decode_full", "load_dataset", "scan_dataset", "split_dataset"]
