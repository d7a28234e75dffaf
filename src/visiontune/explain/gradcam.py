"""Grad-CAM and its relatives for any timm classifier, on top of pytorch-grad-cam (PyPI `grad-cam`).

The target layer is found, not listed per architecture: it is the module that produces the backbone's
final feature map (`forward_features`'s output) — `bn2` for EfficientNet, `layer4` for ResNet, the last
block for MobileNetV3 — or, for a vision transformer, the last block's first norm, whose patch tokens
still carry the gradient of a class-token head. Token and channels-last outputs get the reshape
transform they need. Hooks are released after every call, so explaining many images keeps memory flat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from visiontune.config import EXPLAIN_METHODS as METHODS
from visiontune.data.transforms import Preprocess, normalize
from visiontune.errors import ConfigError, ModelError
from visiontune.models.attention import attention_pool


def _cam_class(method: str):
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, ScoreCAM

    classes = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "hirescam": HiResCAM, "eigencam": EigenCAM,
               "scorecam": ScoreCAM}
    if method not in classes:
        raise ConfigError(f"unknown explanation method {method!r}; choose one of {', '.join(METHODS)}")
    return classes[method]


@dataclass
class TargetLayer:
    name: str
    module: nn.Module
    reshape: object = None  # callable turning the layer's output into N x C x H x W, or None


@dataclass
class Explanation:
    """One image explained: `heatmap` (H x W, 0..1, at the model's input size) over `image` (the crop the
    model saw), the `overlay` of the two, and the model's top-k for the image."""

    image: np.ndarray  # uint8 H x W x 3
    heatmap: np.ndarray  # float32 H x W
    overlay: np.ndarray  # uint8 H x W x 3
    target: str  # the class explained
    predictions: list[tuple[str, float]] = field(default_factory=list)
    method: str = "gradcam"
    layer: str = ""
    source: str = ""
    attention: np.ndarray | None = None  # float32 H x W, 0..1: where an attention head pooled (None: no such head)


def _feature_output(model: nn.Module, size: int) -> tuple[list[tuple[str, nn.Module, torch.Size]], torch.Size]:
    """Every module that ran during forward_features, in the order their forward returned, with output shapes."""
    fired: list[tuple[str, nn.Module, torch.Size]] = []
    names = {id(m): n for n, m in model.named_modules()}
    handles = [m.register_forward_hook(lambda mod, _i, out: fired.append((names[id(mod)], mod, out.shape))
                                       if isinstance(out, torch.Tensor) else None)
               for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            features = model.forward_features(torch.zeros(1, 3, size, size))
    finally:
        for h in handles:
            h.remove()
    if isinstance(features, (list, tuple)):  # several backbones side by side: the last one's map is explained
        features = features[-1]
    return fired, features.shape


def _tokens_to_map(model: nn.Module):
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        patches = tokens[:, prefix:, :]
        h, w = grid if grid else (int(round(patches.shape[1] ** 0.5)),) * 2
        return patches.reshape(tokens.shape[0], h, w, tokens.shape[2]).permute(0, 3, 1, 2)

    return reshape


def _channels_last_to_first(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def find_target_layer(model: nn.Module, input_size: int, name: str | None = None) -> TargetLayer:
    """The layer to explain: `name` if given, else the one producing the final feature map."""
    fired, final = _feature_output(model, input_size)
    num_features = getattr(model, "num_features", None)
    if name:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(f"--layer {name!r}: no such module in {type(model).__name__}; "
                              f"candidates near the end: {', '.join(n for n, _, _ in fired[-6:])}") from None
        shape = next((s for n, _, s in fired if n == name), None)
        if shape is None:
            raise ConfigError(f"--layer {name!r}: it does not run before the classifier's pooling")
        return TargetLayer(name, module, _reshape_for(model, shape, num_features))
    if len(final) == 3:  # tokens (N, T, C): a transformer
        norms = [(n, m) for n, m, s in fired if n.endswith("norm1") and len(s) == 3]
        if not norms:
            raise ModelError(f"{type(model).__name__}: a token model without blocks.*.norm1; pass --layer NAME")
        n, m = norms[-1]
        return TargetLayer(n, m, _tokens_to_map(model))
    if len(final) != 4:
        raise ModelError(f"{type(model).__name__}: its features have shape {tuple(final)}, not a spatial map; "
                         f"pass --layer NAME")
    for n, m, shape in reversed(fired):
        if shape == final:
            return TargetLayer(n, m, _reshape_for(model, shape, num_features))
    raise ModelError(f"{type(model).__name__}: no module produces its final feature map; pass --layer NAME")


def _reshape_for(model: nn.Module, shape: torch.Size, num_features: int | None):
    if len(shape) == 3:
        return _tokens_to_map(model)
    if len(shape) == 4 and num_features and shape[-1] == num_features and shape[1] != num_features:
        return _channels_last_to_first  # Swin and friends keep N x H x W x C
    return None


class Explainer:
    """Explain images with one model, method and layer. The CAM object (and its hooks) lives only for the
    duration of one `heatmaps` call."""

    def __init__(self, model: nn.Module, labels: list[str], preprocess: Preprocess, *, method: str = "gradcam",
                 layer: str | None = None, temperature: float = 1.0):
        self.model = model.eval()
        self.temperature = temperature
        for p in self.model.parameters():
            p.requires_grad_(True)  # gradients must reach the target layer, whatever training froze
        self.labels = labels
        self.preprocess = preprocess
        self.method = method
        self.cam_class = _cam_class(method)
        self.layer = find_target_layer(self.model, preprocess.input_size, layer)
        self.attention = attention_pool(self.model)

    def target_index(self, target: str | int | None) -> int | None:
        if target is None or isinstance(target, (int, np.integer)):
            return None if target is None else int(target)
        if target not in self.labels:
            raise ConfigError(f"--class {target!r}: not one of the model's classes ({', '.join(self.labels[:10])}"
                              f"{', …' if len(self.labels) > 10 else ''})")
        return self.labels.index(target)

    def heatmaps(self, crops: np.ndarray, targets: list[int | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(N x H x W heat maps in 0..1, N x C probabilities, N x H x W attention maps in 0..1 or None) for uint8
        crops; a None target is the top class. One forward and one backward pass: the probabilities (and the
        attention head's map) come from the CAM's own forward."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        x = torch.from_numpy(normalize(crops, self.preprocess))
        if any(t is None for t in targets) and not all(t is None for t in targets):
            with torch.no_grad():
                top = self.model(x).argmax(1).tolist()
            targets = [top[i] if t is None else t for i, t in enumerate(targets)]
        kwargs = {"reshape_transform": self.layer.reshape} if self.layer.reshape else {}
        cam = self.cam_class(model=self.model, target_layers=[self.layer.module], **kwargs)
        if hasattr(cam, "batch_size"):
            cam.batch_size = 32  # Score-CAM's masked forward passes, per batch
        seen: list[torch.Tensor] = []  # the attention map of the first forward (Score-CAM runs many more)
        hook = self.attention.register_forward_hook(
            lambda pool, inputs, _out: seen.append(pool.weights(inputs[0]).detach()) if not seen else None
        ) if self.attention is not None else None
        try:
            chosen = None if targets[0] is None else [ClassifierOutputTarget(c) for c in targets]
            maps = cam(input_tensor=x, targets=chosen)
            probs = torch.softmax(cam.outputs.detach().float() / self.temperature, dim=1).numpy()
        finally:
            # Not `with`: grad-cam's __exit__ swallows IndexError. Release the hooks and the graph explicitly.
            cam.activations_and_grads.release()
            cam.outputs = None
            self.model.zero_grad(set_to_none=True)
            if hook is not None:
                hook.remove()
        attention = _upsampled(seen[0], crops.shape[1:3]) if seen else None
        return np.nan_to_num(maps.astype(np.float32)), probs, attention

    def explain(self, crops: np.ndarray, targets: list[int | None] | None = None, *, top_k: int = 3,
                sources: list[str] | None = None) -> list[Explanation]:
        targets = targets if targets is not None else [None] * len(crops)
        maps, probs, attention = self.heatmaps(crops, targets)
        out = []
        for i, crop in enumerate(crops):
            order = np.argsort(-probs[i])[:top_k]
            target = int(probs[i].argmax()) if targets[i] is None else targets[i]
            out.append(Explanation(crop, maps[i], overlay(crop, maps[i]), self.labels[target],
                                   [(self.labels[j], float(probs[i, j])) for j in order], self.method,
                                   self.layer.name, sources[i] if sources else "",
                                   attention[i] if attention is not None else None))
        return out


def _upsampled(weights: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """N x h x w attention weights -> N x H x W at the crop's size, each scaled to a maximum of 1 (the weights sum
    to 1 over the positions, so their raw scale only says how many positions there are)."""
    maps = torch.nn.functional.interpolate(weights[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    peak = maps.flatten(1).max(dim=1).values.clamp_min(1e-12)
    return (maps / peak[:, None, None]).numpy().astype(np.float32)


def overlay(crop: np.ndarray, heatmap: np.ndarray, image_weight: float = 0.55) -> np.ndarray:
    from pytorch_grad_cam.utils.image import show_cam_on_image

    return show_cam_on_image(crop.astype(np.float32) / 255.0, np.clip(heatmap, 0, 1), use_rgb=True,
                             image_weight=image_weight)
