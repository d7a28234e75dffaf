"""A trained model's pooled features: what its linear classifier sees, for maps of the data and open-set scores.

timm's uniform API gives them for every backbone (`forward_head(..., pre_logits=True)`), and the logits follow from
them through `get_classifier()`, so one pass gives both.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.inference_mode()
def logits_and_features(model: nn.Module, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """normalised N x 3 x S x S float32 -> (N x C logits, N x D pooled features), both float32, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        logits = model.get_classifier()(pooled)
    finally:
        model.train(was_training)
    return logits.float().numpy(), pooled.float().numpy()
