"""Models: backbone registry, offline weights, the classifier, and the saved bundle."""

from visiontune.models.bundle import ModelMeta, load_bundle, save_bundle
from visiontune.models.classifier import build_classifier
from visiontune.models.registry import REGISTRY, get_spec

__all__ = ["REGISTRY", "ModelMeta", "build_classifier", "get_spec", "load_bundle", "save_bundle"]
