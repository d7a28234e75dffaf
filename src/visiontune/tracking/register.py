"""An export in the MLflow model registry: the ONNX file logged as an MLflow ONNX model (with its signature, an
input example and the preprocessing), a new version of a registered model, and aliases pointing at it.

Other integrations log a model as plain files, which the registry cannot take; and MLflow's stages (Staging,
Production) are deprecated: aliases (`champion`) replace them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visiontune.config import MODEL_URI_PREFIX, TrackConfig
from visiontune.models.bundle import read_meta
from visiontune.models.run_dir import RunDir
from visiontune.tracking.connect import mlflow_errors, mlflow_module
from visiontune.tracking.run_log import TrackedRun

MODEL_ARTIFACT = "model"  # the logged model's name inside its run


@dataclass
class Registered:
    name: str
    version: str
    aliases: list[str]

    @property
    def uri(self) -> str:
        return f"{MODEL_URI_PREFIX}{self.name}/{self.version}"

    def summary(self) -> str:
        named = "".join(f", {MODEL_URI_PREFIX}{self.name}@{a}" for a in self.aliases)
        return f"registered: {self.uri}{named}"


def log_onnx_model(mlflow_client, tracked: TrackedRun, run: Path, onnx_file: Path, cfg: TrackConfig) -> Registered | None:
    """Log `onnx_file` (an export of `run`) into the tracked run as an MLflow ONNX model; with cfg.register, register
    it as a new version and point cfg.alias's aliases at it."""
    import onnx

    mlflow = mlflow_module()
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    meta = read_meta(run)
    size = meta.preprocess.input_size
    proto = onnx.load(str(onnx_file))
    # The export's own names: a served copy of the model is called with them.
    in_name, out_name = proto.graph.input[0].name, proto.graph.output[0].name
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, size, size), in_name)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, meta.num_classes), out_name)]))
    # A mid-grey image once preprocessed: the shape and range the model expects (a photo would add ~1 MB of JSON).
    example = ((np.full((1, 3, size, size), 0.5) - np.array(meta.preprocess.mean)[None, :, None, None])
               / np.array(meta.preprocess.std)[None, :, None, None]).astype(np.float32)
    info = {"preprocess": meta.preprocess.to_dict(), "id2label": {str(i): n for i, n in enumerate(meta.labels)},
            "backbone": meta.backbone, "visiontune_file": onnx_file.name}
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with mlflow_errors(tracked.uri):
        try:
            mlflow.set_tracking_uri(tracked.uri or previous[0])
            mlflow.set_registry_uri(tracked.uri or previous[1])
            with mlflow.start_run(run_id=tracked.run_id):
                # One file, labels and preprocessing in its metadata: what `models:/` gives back is what export wrote.
                logged = mlflow.onnx.log_model(proto, name=MODEL_ARTIFACT, signature=signature, input_example=example,
                                               registered_model_name=cfg.register, metadata={"visiontune": info},
                                               save_as_external_data=False, extra_files=[str(RunDir(run).meta)])
        finally:
            mlflow.set_tracking_uri(previous[0])
            mlflow.set_registry_uri(previous[1])
        if not cfg.register:
            return None
        version = str(logged.registered_model_version)
        aliases = [a.strip() for a in (cfg.alias or "").split(",") if a.strip()]
        for alias in aliases:
            mlflow_client.set_registered_model_alias(cfg.register, alias, version)
        return Registered(cfg.register, version, aliases)
