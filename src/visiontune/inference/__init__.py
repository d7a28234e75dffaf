"""Inference: one `Classifier` over PyTorch, TorchScript and ONNX Runtime, and the speed benchmark."""

from visiontune.inference.classifier import Classifier, Prediction

__all__ = ["Classifier", "Prediction"]
