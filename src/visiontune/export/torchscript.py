"""PyTorch -> TorchScript, with model.json stored inside the archive (so the file alone can classify)."""

from __future__ import annotations

import io
import json
import warnings

import torch
from torch import nn

from visiontune.errors import ExportError
from visiontune.models.bundle import ModelMeta
from visiontune.models.run_dir import RunDir
from visiontune.models.static_pad import with_static_padding


def to_torchscript(model: nn.Module, meta: ModelMeta) -> bytes:
    """A traced module (fixed input size, any batch) serialised with model.json as an extra file."""
    size = meta.preprocess.input_size
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about timm's shape arithmetic, fixed by the input size
        try:
            traced = torch.jit.trace(with_static_padding(model, size), torch.zeros(1, 3, size, size), check_trace=False)
            traced = torch.jit.freeze(traced)
        except Exception as exc:
            raise ExportError(f"this architecture cannot be traced to TorchScript ({str(exc).splitlines()[0][:200]})") from None
        buffer = io.BytesIO()
        # torch.jit is deprecated in favour of torch.export, whose archives need torch >= 2.x at the same
        # version to load; TorchScript still loads in C++ (libtorch) and older PyTorch, which is why it is offered.
        torch.jit.save(traced, buffer, _extra_files={RunDir.META: json.dumps(meta.to_dict())})
    return buffer.getvalue()
