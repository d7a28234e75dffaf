"""Several backbones as one model: `efficientnet_lite0+efficientnet_lite1` runs each backbone on the same input
crop, concatenates their pooled features and feeds one classifier.

Why: one backbone's features are all a head sees, and different ImageNet backbones see different things. A linear
probe on Lite0 and Lite1 features concatenated beats either alone by 3 points on oxford102 (BENCHMARKS.md
"Several backbones at once"). The model keeps timm's interface (`forward_features`, `forward_head(pre_logits=True)`,
`get_classifier()`), so training, the bundle, every export, `predict`, `serve` and the unknown score take it as they
take one backbone. It has no stage split, so the cached recipe trains its head on the cached pooled features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from visiontune.errors import ModelError

SEPARATOR = "+"


def is_multi(name: str) -> bool:
    return SEPARATOR in name


def branch_names(name: str) -> list[str]:
    names = [n.strip() for n in name.split(SEPARATOR)]
    if len(names) < 2 or not all(names):
        raise ModelError(f"{name!r}: several backbones are named as a+b (e.g. efficientnet_lite0+efficientnet_lite1)")
    if len(set(names)) != len(names):
        raise ModelError(f"{name!r}: a backbone is named twice")
    return names


class MultiBackbone(nn.Module):
    """Backbones side by side (each built without a classifier), their pooled features concatenated."""

    def __init__(self, branches: list[nn.Module], num_classes: int, drop_rate: float):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.num_features = sum(int(b.num_features) for b in branches)
        self.drop_rate = drop_rate
        self.classifier = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [branch.forward_features(x) for branch in self.branches]

    def forward_head(self, features: list[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        pooled = torch.cat([b.forward_head(f, pre_logits=True) for b, f in zip(self.branches, features)], dim=1)
        if pre_logits:
            return pooled
        return self.classifier(F.dropout(pooled, p=self.drop_rate, training=self.training))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.classifier


def same_preprocessing(specs: list, name: str) -> None:
    """The branches see one crop, so they must agree on how it is normalised."""
    first = specs[0].preprocess
    for spec in specs[1:]:
        p = spec.preprocess
        if (tuple(p.mean), tuple(p.std), p.interpolation) != (tuple(first.mean), tuple(first.std), first.interpolation):
            raise ModelError(f"{name}: {specs[0].name} and {spec.name} normalise their input differently "
                             f"(mean/std {first.mean}/{first.std} against {p.mean}/{p.std}); several backbones "
                             f"share one input, so they must agree")
