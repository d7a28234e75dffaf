"""The unknown score as part of the network: one pass gives (logits, unknown_score).

`OpenSetHead` holds a fit (`models/open_set.py`) as buffers after the pooled features; `WithUnknownScore` wraps a
timm classifier so its forward returns both outputs. Tracing that module is how the score gets into every exported
graph (ONNX, TorchScript, OpenVINO from ONNX), so every engine computes the same number.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from visiontune.errors import ModelError
from visiontune.models.bundle import ModelMeta
from visiontune.models.open_set import EPS, OpenSetFit, current_fit
from visiontune.models.run_dir import RunDir

SCOPE = "open_set"  # the attribute name: its nodes are /open_set/* in a traced graph


class OpenSetHead(nn.Module):
    """Pooled features (N x D) -> N cosine distances to the nearest training image, in the fit's PCA space."""

    keeps_float32 = True  # an fp16 export keeps these: the distance is computed from float32 features

    def __init__(self, fit: OpenSetFit):
        super().__init__()
        for name, array in fit.to_arrays().items():
            self.register_buffer(name, torch.from_numpy(array.copy()))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        z = (pooled.to(self.center.dtype) - self.center) @ self.components
        z = z / torch.clamp(torch.linalg.vector_norm(z, dim=1, keepdim=True), min=EPS)
        return torch.clamp(1.0 - torch.amax(z @ self.references.T, dim=1), min=0.0)  # rounding: never below 0


class WithUnknownScore(nn.Module):
    """A timm classifier whose forward returns (logits, unknown_score): the logits are the classifier's own
    (`forward_head` without pre_logits is the classifier on the pooled features; dropout is off in eval mode)."""

    def __init__(self, model: nn.Module, fit: OpenSetFit):
        super().__init__()
        self.model = model
        setattr(self, SCOPE, OpenSetHead(fit))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.model.get_classifier()(pooled), getattr(self, SCOPE)(pooled)


def attach(model: nn.Module, folder: Path, meta: ModelMeta) -> nn.Module:
    """`model` with the run's unknown score when it has a current one (see `open_set.current_fit`), else unchanged."""
    fit = current_fit(folder, meta)
    if fit is None:
        return model
    width = getattr(model.get_classifier(), "in_features", None)
    if width is not None and width != fit.center.shape[0]:
        raise ModelError(f"{RunDir(folder).open_set}: fitted on {fit.center.shape[0]} features, but the model pools "
                         f"{width}; evaluate the run again to refit it")
    return WithUnknownScore(model, fit).eval()


def split_outputs(out) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A module's output -> (logits, unknown score or None), for modules with and without the score."""
    if isinstance(out, (tuple, list)):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None
