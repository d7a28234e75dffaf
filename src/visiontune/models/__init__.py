"""Models: backbone registry, offline weights, the classifier, and the saved bundle."""

from visiontune.models.bundle import ModelMeta, load_bundle, save_bundle
from visiontune.models.registry import REGISTRY, get_spec


def __getattr__(name: str):
    # build_classifier needs torch; reading a bundle's model.json (ONNX-only prediction) should not import it.
    if name == "build_classifier":
        from visiontune.models.classifier import build_classifier

        return build_classifier
    raise AttributeError(f"module 'visiontune.models' has no attribute {name!r}")


__all__ = ["REGISTRY", "ModelMeta", "build_classifier", "get_spec", "load_bundle", "save_bundle"]
