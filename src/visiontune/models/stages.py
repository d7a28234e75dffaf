"""A backbone as a list of stages, so training can freeze the bottom and cache activations at a boundary.

Stages share their modules with the timm model (no copies): running them in order is exactly
`model.forward_features`. Architectures not listed here still train (head only, or --full-finetune).
"""

from __future__ import annotations

from torch import nn


def stages(model: nn.Module) -> list[nn.Module] | None:
    """The backbone's stages, bottom to top, or None when the architecture is not known to split cleanly."""
    kind = type(model).__name__
    if kind == "EfficientNet":  # also MobileNetV2, MixNet, tf_efficientnet_lite*
        return [nn.Sequential(model.conv_stem, model.bn1), *model.blocks, nn.Sequential(model.conv_head, model.bn2)]
    if kind == "MobileNetV3":  # its conv_head comes after pooling, in forward_head
        return [nn.Sequential(model.conv_stem, model.bn1), *model.blocks]
    if kind == "ResNet":
        return [nn.Sequential(model.conv1, model.bn1, model.act1, model.maxpool),
                model.layer1, model.layer2, model.layer3, model.layer4]
    if kind == "ConvNeXt":
        return [model.stem, *model.stages, model.norm_pre]
    return None


def frozen_trainable(model: nn.Module, trainable_stages: int) -> tuple[nn.Sequential, nn.Sequential] | None:
    """(frozen bottom, trainable top) with the top `trainable_stages` stages trainable; None if unsplittable."""
    parts = stages(model)
    if parts is None or trainable_stages <= 0:
        return None
    k = min(trainable_stages, len(parts) - 1)
    return nn.Sequential(*parts[:-k]), nn.Sequential(*parts[-k:])
