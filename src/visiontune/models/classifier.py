"""Build the classifier: a timm backbone with global pool -> dropout -> linear, sized for the dataset."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from visiontune.errors import ModelError
from visiontune.models.attention import attach_attention
from visiontune.models.multi import MultiBackbone, branch_names, is_multi
from visiontune.models.registry import BackboneSpec, get_spec
from visiontune.models.weights import create_pretrained


def build_classifier(model_name: str, num_classes: int, *, dropout: float, weights: Path | None = None,
                     from_scratch: bool = False, allow_download: bool = False,
                     input_size: int = 0, head: str = "linear") -> tuple[nn.Module, BackboneSpec]:
    """A timm model whose head (timm's own: pool -> dropout -> linear) has `num_classes` outputs.

    timm's uniform API then gives every part training needs: `forward_features` (feature map),
    `forward_head(x, pre_logits=True)` (pooled features) and `get_classifier()` (the linear layer). With
    head "attention" the pool is a learned spatial attention (models/attention.py), added after the pretrained
    weights are loaded (they have none for it).
    """
    spec = get_spec(model_name).at_size(input_size)
    if is_multi(model_name):
        model, spec = _build_multi(spec, num_classes, dropout, weights, from_scratch, allow_download, head)
        return model, spec
    model, spec = create_pretrained(spec, num_classes, dropout, weights=weights, from_scratch=from_scratch,
                                    allow_download=allow_download)
    # timm's EfficientNet init draws the new classifier from U(+-1/sqrt(num_classes)): with 5 classes and
    # 1280 pooled features that starts at logits of several units and a loss near 6. Zeros start at log(C).
    classifier = model.get_classifier()
    if isinstance(classifier, nn.Linear):
        nn.init.zeros_(classifier.weight)
        nn.init.zeros_(classifier.bias)
    if head == "attention":
        attach_attention(model)
    return model, spec


def _build_multi(spec: BackboneSpec, num_classes: int, dropout: float, weights: Path | None, from_scratch: bool,
                 allow_download: bool, head: str) -> tuple[nn.Module, BackboneSpec]:
    """Several backbones side by side, each with its own pretrained weights, all at the first one's input size."""
    if weights is not None:
        raise ModelError(f"{spec.name}: --weights gives one backbone's weights; name one backbone with it")
    if head != "linear":
        raise ModelError(f"{spec.name}: --head {head} pools one feature map; several backbones take the linear head")
    size = spec.preprocess.input_size
    branches = [create_pretrained(get_spec(name).at_size(size), 0, 0.0, from_scratch=from_scratch,
                                  allow_download=allow_download)[0] for name in branch_names(spec.name)]
    model = MultiBackbone(branches, num_classes, dropout)
    nn.init.zeros_(model.classifier.weight)  # as for one backbone: start at log(C)
    nn.init.zeros_(model.classifier.bias)
    return model, spec


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
