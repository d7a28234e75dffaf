"""The spatial-attention head (`--head attention`): a learned map over the last feature map decides where to pool.

Global average pooling weighs every position of the final feature map alike, so a flower in a corner shares its
vote with the lawn around it. Here a small scorer (1x1 convolutions, tanh, as in attention-based multiple-instance
pooling) gives each position a weight, softmax over the positions, and the pooled features are the weighted sum.

Its last layer starts at zero, so the weights start uniform and the head starts as exactly the average pool the
backbone was pretrained with: the pooled features (and the cached ones the recipe's phase 1 fits on) are the same,
and training moves away from the average only as far as it helps.
"""

from __future__ import annotations

import torch
from torch import nn

from visiontune.errors import ConfigError

_HIDDEN = 128  # the scorer's width: enough for a per-position relevance, small beside a 1280-wide classifier


class SpatialAttentionPool(nn.Module):
    """N x C x H x W -> N x C (or N x C x 1 x 1 where the backbone's own pool kept those dimensions)."""

    def __init__(self, channels: int, flatten: bool = True, hidden: int = _HIDDEN):
        super().__init__()
        self.flatten = flatten
        self.hidden = nn.Conv2d(channels, hidden, 1)
        self.score = nn.Conv2d(hidden, 1, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention map: N x H x W, each map summing to 1."""
        n, _, h, w = x.shape
        return torch.softmax(self.score(torch.tanh(self.hidden(x))).reshape(n, h * w), dim=1).reshape(n, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = (x * self.weights(x).unsqueeze(1)).sum(dim=(2, 3))
        return pooled if self.flatten else pooled[:, :, None, None]


def _pool_owner(model: nn.Module) -> nn.Module | None:
    """The module whose `global_pool` turns the final feature map into features (timm's CNNs keep it on the model,
    ConvNeXt and friends on their head)."""
    for owner in (model, getattr(model, "head", None)):
        if isinstance(owner, nn.Module) and isinstance(getattr(owner, "global_pool", None), nn.Module):
            return owner
    return None


def attach_attention(model: nn.Module) -> nn.Module:
    """Replace the backbone's global pool by a `SpatialAttentionPool` (in place); refuse a model without one."""
    owner = _pool_owner(model)
    pool = getattr(owner, "global_pool", None)
    if owner is None or not hasattr(pool, "flatten"):
        raise ConfigError(f"--head attention: {type(model).__name__} does not pool a spatial feature map "
                          f"(a CNN backbone does; use --head linear)")
    owner.global_pool = SpatialAttentionPool(int(model.num_features), flatten=not isinstance(pool.flatten, nn.Identity))
    return model


def attention_pool(model: nn.Module) -> SpatialAttentionPool | None:
    owner = _pool_owner(model)
    pool = getattr(owner, "global_pool", None) if owner is not None else None
    return pool if isinstance(pool, SpatialAttentionPool) else None


def head_modules(model: nn.Module) -> list[nn.Module]:
    """What training fits as "the head": the classifier, and the attention pool when the model has one."""
    pool = attention_pool(model)
    return ([pool] if pool is not None else []) + [model.get_classifier()]
