"""The standard TFLite model metadata of an image classifier, and its label file, for tools other than visiontune.

MediaPipe's ImageClassifier and the TFLite Task Library read a model's labels and input normalisation from the
`TFLITE_METADATA` buffer (TensorFlow Lite Support's `metadata_schema.fbs`, file identifier "M001") and from the
files zipped onto the end of the flatbuffer that it names. The schema's Python bindings ship only with
tflite-support, which needs protobuf < 4 (ours is 7), so the few tables used here are written with flatbuffers'
Builder; the slot numbers are the field order of those tables in the schema (a union takes two: type, value).
"""

from __future__ import annotations

import io
import zipfile

import flatbuffers
import numpy as np

from visiontune.models.bundle import ModelMeta

NAME = "TFLITE_METADATA"
LABELS_FILE = "labels.txt"
_IDENTIFIER = b"M001"
_PARSER_VERSION = "1.0.0"  # every field written here is in the schema's first version
_IMAGE_PROPERTIES, _FEATURE_PROPERTIES = 2, 1  # ContentProperties union members
_NORMALIZATION_OPTIONS = 1  # ProcessUnitOptions union member
_RGB = 1  # ColorSpaceType
_TENSOR_AXIS_LABELS = 2  # AssociatedFileType


def model_metadata(meta: ModelMeta, version: str) -> bytes:
    """The `TFLITE_METADATA` flatbuffer: one NHWC RGB float input normalised as (pixel - mean) / std on the 0-255
    scale (what the Task Library and MediaPipe apply), one output of raw logits labelled by `labels.txt`."""
    b = flatbuffers.Builder(1024)
    pre = meta.preprocess
    mean = np.asarray(pre.mean, np.float32) * 255.0
    std = np.asarray(pre.std, np.float32) * 255.0
    labels_file = _associated_file(b, LABELS_FILE, "Labels of the output, one a line, in output order.")
    image = _tensor(
        b, "image",
        f"RGB image, {pre.input_size} x {pre.input_size}, resized ({pre.interpolation}) and centre-cropped "
        f"(crop fraction {pre.crop_pct}), then normalised as (pixel - mean) / std per channel.",
        content=_image_content(b), process_unit=_normalization(b, mean, std),
        stats=(((255.0 - mean) / std).tolist(), ((0.0 - mean) / std).tolist()))
    logits = _tensor(
        b, "logits", "Raw logits, one per label; softmax(logits / T) gives probabilities (T: the temperature in "
                     "the visiontune.model metadata, 1 when absent).",
        content=_feature_content(b), labels=labels_file)
    subgraph = _table(b, 10, {0: b.CreateString("image_classifier"), 2: _vector(b, [image]), 3: _vector(b, [logits])})
    root = _table(b, 8, {
        0: b.CreateString(f"visiontune {meta.backbone} classifier"),
        1: b.CreateString(f"Classifies an image as one of {meta.num_classes} labels: {', '.join(meta.labels[:20])}"
                          + (", ..." if meta.num_classes > 20 else "")),
        2: b.CreateString(version),
        3: _vector(b, [subgraph]),
        4: b.CreateString("visiontune"),
        7: b.CreateString(_PARSER_VERSION)})
    b.Finish(root, file_identifier=_IDENTIFIER)
    return bytes(b.Output())


def labels_zip(labels: list[str]) -> bytes:
    """The archive appended to the flatbuffer (the Support library's layout, which also makes the .tflite a zip
    file `unzip -l` lists); stored, not compressed, as its readers expect."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(LABELS_FILE, "".join(f"{label}\n" for label in labels))
    return out.getvalue()


def _table(b: flatbuffers.Builder, fields: int, offsets: dict[int, int], bytes_: dict[int, int] | None = None) -> int:
    """A table with offset fields (strings, vectors, tables) and byte fields (enums, union types), by slot."""
    b.StartObject(fields)
    for slot, offset in offsets.items():
        b.PrependUOffsetTRelativeSlot(slot, offset, 0)
    for slot, value in (bytes_ or {}).items():
        b.PrependUint8Slot(slot, value, 0)
    return b.EndObject()


def _vector(b: flatbuffers.Builder, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        b.PrependUOffsetTRelative(offset)
    return b.EndVector()


def _floats(b: flatbuffers.Builder, values) -> int:
    return b.CreateNumpyVector(np.asarray(values, dtype=np.float32))


def _associated_file(b: flatbuffers.Builder, name: str, description: str) -> int:
    # AssociatedFile: name, description, type
    return _table(b, 5, {0: b.CreateString(name), 1: b.CreateString(description)}, {2: _TENSOR_AXIS_LABELS})


def _image_content(b: flatbuffers.Builder) -> int:
    properties = _table(b, 2, {}, {0: _RGB})  # ImageProperties: color_space
    return _table(b, 3, {1: properties}, {0: _IMAGE_PROPERTIES})  # Content: properties type, properties


def _feature_content(b: flatbuffers.Builder) -> int:
    return _table(b, 3, {1: _table(b, 0, {})}, {0: _FEATURE_PROPERTIES})


def _normalization(b: flatbuffers.Builder, mean: np.ndarray, std: np.ndarray) -> int:
    options = _table(b, 2, {0: _floats(b, mean), 1: _floats(b, std)})  # NormalizationOptions: mean, std
    return _table(b, 2, {1: options}, {0: _NORMALIZATION_OPTIONS})  # ProcessUnit: options type, options


def _tensor(b: flatbuffers.Builder, name: str, description: str, *, content: int, process_unit: int | None = None,
            stats: tuple[list, list] | None = None, labels: int | None = None) -> int:
    """TensorMetadata: name 0, description 1, content 3, process_units 4, stats 5 (max 0, min 1), files 6."""
    fields = {0: b.CreateString(name), 1: b.CreateString(description), 3: content}
    if process_unit is not None:
        fields[4] = _vector(b, [process_unit])
    if stats is not None:
        fields[5] = _table(b, 2, {0: _floats(b, stats[0]), 1: _floats(b, stats[1])})
    if labels is not None:
        fields[6] = _vector(b, [labels])
    return _table(b, 7, fields)
