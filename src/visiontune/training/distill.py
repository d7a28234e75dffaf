"""Knowledge distillation inside the cached recipe.

The student trains on 1 + `views` cached views of every training image (the centre crop and seeded
augmentations, see feature_cache.view_crop). The teacher's logits are computed once for exactly those crops
(the teacher resizes each one to its own input size and normalisation) and cached on disk beside the frozen
features, keyed the same way plus the teacher's identity: on a CPU the teacher's forward passes are the
expensive part, and every epoch of both phases reuses them.

`training` never imports `inference`: the teacher arrives as an object built by the API layer
(`visiontune.jobs.teacher.RunTeacher`) that follows the `Teacher` protocol below.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from visiontune.config import TrainConfig
from visiontune.data.parallel import progress
from visiontune.data.split import Split
from visiontune.data.transforms import Augment, Preprocess
from visiontune.errors import ConfigError
from visiontune.training.feature_cache import DiskCache, ViewCache, cache_key, view_crop


class Teacher(Protocol):
    identity: str  # digest of everything the teacher's logits depend on (weights, calibration, members)

    def prepare(self, classes: list[str], split: Split) -> list[str]:
        """Check the teacher knows exactly `classes` (columns come back in this order) and did not train on
        the student's test images; returns notes for the run. Raises a VisiontuneError otherwise."""

    def logits(self, crops: np.ndarray, spec: Preprocess) -> np.ndarray:
        """uint8 N x S x S x 3 crops made with the student's `spec` -> float32 N x C raw teacher logits."""


def check_settings(cfg: TrainConfig, teacher: Teacher | None) -> None:
    d = cfg.distill
    if not d.teacher:
        return
    if teacher is None:
        raise ConfigError(f"the settings name a teacher ({d.teacher}) but none was loaded; "
                          f"train through visiontune.train / visiontune.distill, which load it")


def teacher_view_logits(teacher: Teacher, images: list, digests: list[str], indices: np.ndarray, views: int,
                        spec: Preprocess, aug: Augment, seed: int, disk: DiskCache, batch: int, *, quiet: bool,
                        notes: list[str]) -> np.ndarray:
    """views x n x C float32: the teacher's logits for view v of training image indices[k], from the disk
    cache when an earlier run (same files, views, augmentation, seed and teacher) computed them."""
    key = cache_key(kind="teacher-logits", files=[digests[i] for i in indices], teacher=teacher.identity,
                    preprocess=spec.to_dict(), views=views, augment=aug if views > 1 else None,
                    seed=seed if views > 1 else None)
    found = disk.load(key)
    if found is not None:
        notes.append(f"teacher logits for {views} view(s) of {len(indices)} training images: reused from the cache")
        return found.pooled
    started = time.perf_counter()
    n, batch = len(indices), max(1, batch)
    jobs = [(v, int(i)) for v in range(views) for i in indices]  # row v * n + k: view v of image indices[k]
    chunks = [jobs[k:k + batch] for k in range(0, len(jobs), batch)]
    flat: np.ndarray | None = None

    def make_crops(chunk):
        return np.stack([view_crop(images[i], v, i, seed, spec, aug) for v, i in chunk])

    # One thread crops the next chunk (Pillow releases the GIL) while the teacher runs on this one.
    with ThreadPoolExecutor(max_workers=1) as pool, progress(len(jobs), "teacher logits", quiet) as bar:
        pending = pool.submit(make_crops, chunks[0]) if chunks else None
        for k, chunk in enumerate(chunks):
            crops = pending.result()
            if k + 1 < len(chunks):
                pending = pool.submit(make_crops, chunks[k + 1])
            logits = np.asarray(teacher.logits(crops, spec), dtype=np.float32)
            if flat is None:
                flat = np.zeros((len(jobs), logits.shape[1]), dtype=np.float32)
            flat[k * batch:k * batch + len(chunk)] = logits
            bar.update(len(chunk))
    assert flat is not None, "no training images"
    out = flat.reshape(views, n, -1)
    disk.save(key, ViewCache(None, out))
    notes.append(f"teacher logits for {views} view(s) of {n} training images computed in "
                 f"{time.perf_counter() - started:.0f} s")
    return out


def distill_loss(label_loss: Callable, teacher_logits: np.ndarray, alpha: float, temperature: float,
                 device: torch.device) -> Callable:
    """The student's loss: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * label_loss.

    `teacher_logits` is views x n x C, flattened to rows the way the phases flatten their cached views
    (row = view * n + image); the loss looks up the rows of the batch (`rows`), and mixes the teacher's
    probabilities with the same (lam, perm) as the inputs when phase 2 uses feature mixup (`mix`).
    """
    flat = torch.from_numpy(np.ascontiguousarray(teacher_logits.reshape(-1, teacher_logits.shape[-1]))).to(device)
    t = float(temperature)

    def loss(logits: torch.Tensor, target: torch.Tensor, rows=None, mix=None) -> torch.Tensor:
        if rows is None:
            raise RuntimeError("distillation loss called without the batch's rows")  # a bug, not a user error
        index = torch.as_tensor(np.asarray(rows), dtype=torch.long, device=flat.device)
        p_teacher = F.softmax(flat[index].float() / t, dim=1)
        if mix is not None:
            lam, perm = mix
            p_teacher = lam * p_teacher + (1 - lam) * p_teacher[perm]
        log_student = F.log_softmax(logits.float() / t, dim=1)
        kl = (torch.xlogy(p_teacher, p_teacher) - p_teacher * log_student).sum(dim=1).mean()
        total = alpha * t * t * kl
        if alpha < 1.0:
            total = total + (1.0 - alpha) * label_loss(logits, target)
        return total

    return loss


def kl_to_teacher(student_logits: np.ndarray, teacher_logits: np.ndarray, temperature: float = 1.0) -> float:
    """Mean KL(softmax(teacher / T) || softmax(student / T)) over rows, in nats (for reports and tests)."""
    s = torch.from_numpy(np.asarray(student_logits, dtype=np.float32)) / temperature
    p = F.softmax(torch.from_numpy(np.asarray(teacher_logits, dtype=np.float32)) / temperature, dim=1)
    return float((torch.xlogy(p, p) - p * F.log_softmax(s, dim=1)).sum(dim=1).mean())
