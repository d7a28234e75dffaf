"""What a model path is: a run directory, an ensemble directory, an ONNX, TorchScript, OpenVINO or TFLite file, or a
model in MLflow's registry (`models:/...`, fetched as its ONNX file).

Decided here once; `inference.resolve` loads what this finds, and explain, serve and bench ask it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from visiontune.errors import ModelError
from visiontune.models.registered import fetch_registered, is_registered_uri
from visiontune.models.run_dir import RunDir

ONNX_SUFFIXES = (".onnx",)
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript", ".jit")
OPENVINO_SUFFIXES = (".xml",)  # an OpenVINO IR: the .xml, its weights in the .bin beside it
TFLITE_SUFFIXES = (".tflite",)
KINDS = ("run", "ensemble", "onnx", "torchscript", "openvino", "tflite")


@dataclass(frozen=True)
class ModelPath:
    kind: str  # one of KINDS
    path: Path

    @property
    def is_folder(self) -> bool:
        return self.kind in ("run", "ensemble")


def locate_model(path: str | Path) -> ModelPath:
    """Classify `path`; pointing at a bundle's own file (model.json, model.safetensors) means its folder; a
    registry URI (models:/NAME/VERSION, models:/NAME@alias) means its ONNX file, fetched from MLflow."""
    if is_registered_uri(path):
        return ModelPath("onnx", fetch_registered(str(path)))
    path = Path(path)
    if path.is_file() and path.name in (RunDir.META, RunDir.WEIGHTS):
        path = path.parent
    if path.is_dir():
        if RunDir(path).is_ensemble:
            return ModelPath("ensemble", path)
        if not RunDir(path).meta.is_file():
            raise ModelError(f"{path}: not a visiontune run or model folder ({RunDir.META} is missing)")
        return ModelPath("run", path)
    if not path.exists():
        raise ModelError(f"{path}: no such model file or run folder")
    if not path.is_file():
        raise ModelError(f"{path}: not a regular file")
    return ModelPath(_file_kind(path), path)


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    if suffix in TORCHSCRIPT_SUFFIXES:
        return "torchscript"
    if suffix in OPENVINO_SUFFIXES:
        return "openvino"
    if suffix in TFLITE_SUFFIXES:
        return "tflite"
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[4:8] == b"TFL3":  # a TFLite flatbuffer's file identifier
        return "tflite"
    return "torchscript" if head[:4] == b"PK\x03\x04" else "onnx"  # TorchScript archives are zip files


def require_run(path: str | Path, why: str) -> Path:
    """The run directory at `path`, or a ModelError saying why an export or an ensemble will not do."""
    found = locate_model(path)
    if found.kind == "ensemble":
        raise ModelError(f"{found.path}: an ensemble is several networks, and {why} needs one; use one of its members")
    if found.kind != "run":
        raise ModelError(f"{found.path}: {why} needs the PyTorch model; pass the run directory (the folder with "
                         f"{RunDir.WEIGHTS} and {RunDir.META}), not an exported file")
    return found.path
