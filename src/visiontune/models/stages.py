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
    if kind == "VisionTransformer":  # ViT, DeiT, DINOv2, ...: tokens in, tokens out, block after block
        return [_TokenStem(model), *model.blocks, model.norm]
    return None


class _TokenStem(nn.Module):
    """A ViT's input end as one stage: patch embedding, class/register tokens and position embedding."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.patch_embed, self.patch_drop, self.norm_pre = vit.patch_embed, vit.patch_drop, vit.norm_pre
        # `_pos_embed` reads the ViT's own tokens and embeddings; a plain reference, not a child module, so the
        # stage does not own (or list the parameters of) the whole network it belongs to.
        object.__setattr__(self, "_vit", vit)

    def forward(self, x):
        return self.norm_pre(self.patch_drop(self._vit._pos_embed(self.patch_embed(x))))


def frozen_trainable(model: nn.Module, trainable_stages: int) -> tuple[nn.Sequential, nn.Sequential] | None:
    """(frozen bottom, trainable top) with the top `trainable_stages` stages trainable; None if unsplittable."""
    parts = stages(model)
    if parts is None or trainable_stages <= 0:
        return None
    k = min(trainable_stages, len(parts) - 1)
    return nn.Sequential(*parts[:-k]), nn.Sequential(*parts[-k:])
