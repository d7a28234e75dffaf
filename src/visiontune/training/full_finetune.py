"""`--full-finetune`: every layer trains, on a fresh augmentation of every image every epoch.

The natural recipe on a GPU (AMP and channels-last there); on a CPU it is the slow, thorough option.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn

from visiontune.config import TrainConfig
from visiontune.data.transforms import Augment, Preprocess, augment_crop, center_crop, normalize
from visiontune.training.loops import batch_rng, make_loss, optimizer_step, run_epochs
from visiontune.training.phases import BestState, Score, WeightAverage


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _randaugment():
    from timm.data.auto_augment import rand_augment_transform

    return rand_augment_transform("rand-m9-mstd0.5", {"img_mean": (124, 116, 104)})


def _mix(x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: TrainConfig, rng: np.random.Generator):
    """Mixup or cutmix (one of them per batch, when enabled) with soft targets."""
    onehot = torch.nn.functional.one_hot(y, num_classes).float()
    choices = [k for k, a in (("mixup", cfg.augment.mixup), ("cutmix", cfg.augment.cutmix)) if a > 0]
    if not choices:
        return x, y
    kind = choices[int(rng.integers(len(choices)))]
    alpha = cfg.augment.mixup if kind == "mixup" else cfg.augment.cutmix
    lam = float(rng.beta(alpha, alpha))
    perm = torch.from_numpy(rng.permutation(len(x))).to(x.device)
    if kind == "mixup":
        x = lam * x + (1 - lam) * x[perm]
    else:
        h, w = x.shape[2:]
        ch, cw = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return x, lam * onehot + (1 - lam) * onehot[perm]


def full_finetune(model: nn.Module, spec: Preprocess, cfg: TrainConfig, aug: Augment, images: list, sets,
                  ctx) -> dict[str, Score]:
    device = ctx.device
    num_classes = sets.num_classes
    y_train = sets.labels[sets.train]
    loss_fn = make_loss(cfg, y_train, num_classes)
    dtype = amp_dtype(cfg, device)
    channels_last = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(True)
    randaug = _randaugment() if cfg.augment.randaugment else None
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def to_device(batch: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(batch).to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def crops(idx: np.ndarray, epoch: int) -> np.ndarray:
        out = []
        for j in idx:
            i = int(sets.train[j])
            crop = augment_crop(images[i], spec, aug, np.random.default_rng([cfg.seed, 1000 + epoch, i]))
            if randaug is not None:
                crop = np.asarray(randaug(Image.fromarray(crop)))
            out.append(crop)
        return normalize(np.stack(out), spec)

    trained = ctx.dist.wrap(model, device)

    def step(idx, optimizer, epoch):
        model.train()
        x = to_device(crops(idx, epoch))
        target = torch.from_numpy(y_train[idx].astype(np.int64)).to(device)
        x, soft = _mix(x, target, num_classes, cfg, batch_rng(cfg.seed, epoch, idx))
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = trained(x)
            loss = loss_fn(logits, soft)
        return optimizer_step(optimizer, loss, logits, target, scaler if scaler.is_enabled() else None)

    def eval_inputs(indices: np.ndarray) -> np.ndarray:
        return normalize(np.stack([center_crop(images[i], spec.input_size) for i in indices]), spec)

    val_x = eval_inputs(sets.val) if len(sets.val) else None
    y_val = sets.labels[sets.val]

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)

    def validate():
        model.eval()
        return ctx.evaluate(forward, val_x, y_val, batch_size=64)

    run_epochs("full", cfg.finetune_epochs, [{"params": list(model.parameters()), "lr": cfg.finetune_lr}],
               len(y_train), cfg, step, validate, BestState(model), ctx.history, cfg.batch_size, y_train,
               model=model, checkpoint=ctx.checkpoint, resume=ctx.resume,
               average=WeightAverage(model, cfg.ema) if cfg.ema else None)
    model.eval()
    scores = {}
    for name, indices in (("val", sets.val), ("test", sets.test)):
        score = ctx.evaluate(forward, eval_inputs(indices) if len(indices) else None, sets.labels[indices], batch_size=64)
        if score is not None:
            scores[name] = score
    return scores
