"""The visiontune keys in an ONNX model's metadata_props, written at export and read at load.

Kept apart from the exporter so that reading a .onnx file's labels and preprocessing needs neither torch
nor the onnx package: ONNX Runtime hands the map over as plain strings.
"""

from __future__ import annotations

import json

from visiontune.errors import ModelError
from visiontune.models.bundle import ModelMeta

INPUT = "input"
OUTPUT = "logits"
MODEL_KEY = "visiontune.model"  # model.json, as a JSON string
METRICS_KEY = "visiontune.metrics"  # the run's metrics.json (may be absent)
EXPORT_KEY = "visiontune.export"  # precision, opset, versions, parity


def embed_metadata(proto, meta: ModelMeta, metrics: dict | None, export_info: dict):
    """Replace the visiontune keys of `proto.metadata_props` (other tools' keys are kept)."""
    values = {MODEL_KEY: json.dumps(meta.to_dict()), EXPORT_KEY: json.dumps(export_info)}
    if metrics:
        values[METRICS_KEY] = json.dumps(metrics)
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key not in values and p.key != METRICS_KEY]
    del proto.metadata_props[:]
    for key, value in [*kept, *values.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "visiontune"
    proto.doc_string = f"visiontune {meta.backbone} classifier: {', '.join(meta.labels[:20])}"
    return proto


def read_metadata(custom: dict[str, str], where: str) -> tuple[ModelMeta, dict, dict]:
    """(model description, metrics, export info) from an ONNX file's metadata map."""
    if MODEL_KEY not in custom:
        raise ModelError(f"{where}: an ONNX model, but not a visiontune one (no {MODEL_KEY!r} metadata with labels "
                         f"and preprocessing); export it with `visiontune export`")
    try:
        data = json.loads(custom[MODEL_KEY])
        metrics = json.loads(custom.get(METRICS_KEY, "{}"))
        info = json.loads(custom.get(EXPORT_KEY, "{}"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{where}: damaged visiontune metadata ({exc})") from None
    return ModelMeta.from_dict(data, where), metrics, info
