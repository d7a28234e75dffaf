"""What every training phase carries: the data's index sets, scores, the best weights so far, the loaded
checkpoint, and the context (device, history, checkpoint, processes) a phase runs in."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from visiontune.config import TrainConfig
from visiontune.data.transforms import Augment
from visiontune.training.distributed import Dist
from visiontune.training.history import History


@dataclass
class Sets:
    """Indices (into the decoded image list) and labels of each split."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    labels: np.ndarray  # per decoded image: a class index, or a 0/1 row per label for a multi-label run

    @property
    def num_classes(self) -> int:
        return self.labels.shape[1] if self.labels.ndim == 2 else int(self.labels.max()) + 1

    @property
    def score_name(self) -> str:
        """What Score.accuracy means for these labels."""
        return "mAP" if self.labels.ndim == 2 else "top-1"


def augment_from(cfg: TrainConfig) -> Augment:
    a = cfg.augment
    return Augment(tuple(a.scale), tuple(a.ratio), a.hflip, a.rotate_degrees, a.brightness, a.contrast)


@dataclass
class Score:
    loss: float
    accuracy: float

    def better_than(self, other: "Score | None") -> bool:
        if other is None:
            return True
        return (self.accuracy, -self.loss) > (other.accuracy, -other.loss)


@torch.no_grad()
def evaluate_logits(forward: Callable[[torch.Tensor], torch.Tensor], inputs: np.ndarray, labels: np.ndarray,
                    device: torch.device, batch_size: int = 256) -> tuple[Score, np.ndarray]:
    """Loss and accuracy of `forward` over cached inputs, and the logits (for metrics downstream)."""
    chunks = []
    for start in range(0, len(inputs), batch_size):
        x = torch.from_numpy(np.asarray(inputs[start:start + batch_size], dtype=np.float32)).to(device)
        chunks.append(forward(x).float().cpu())
    logits = torch.cat(chunks) if chunks else torch.zeros(0, 1)
    if labels.ndim == 2:
        return multilabel_score(logits, labels), logits.numpy()
    target = torch.from_numpy(labels.astype(np.int64))
    loss = F.cross_entropy(logits, target).item() if len(labels) else float("nan")
    acc = (logits.argmax(1) == target).float().mean().item() if len(labels) else float("nan")
    return Score(loss, acc), logits.numpy()


def multilabel_score(logits: torch.Tensor, labels: np.ndarray) -> Score:
    """Multi-label: binary cross-entropy, and mean average precision (over the labels present) as the "accuracy"
    that epochs and phases are chosen by (it needs no threshold, which is chosen after training)."""
    if not len(labels):
        return Score(float("nan"), float("nan"))
    from sklearn.metrics import average_precision_score

    target = torch.from_numpy(labels.astype(np.float32))
    loss = F.binary_cross_entropy_with_logits(logits.float(), target).item()
    present = labels.sum(axis=0) > 0
    scores = logits.numpy()
    ap = [average_precision_score(labels[:, c], scores[:, c]) for c in np.flatnonzero(present)]
    return Score(loss, float(np.mean(ap)) if ap else float("nan"))


@dataclass
class BestState:
    """The weights of the best epoch so far, by validation score (kept in memory, restored at the end)."""

    module: nn.Module
    score: Score | None = None
    epoch: int = -1
    state: dict = field(default_factory=dict)

    def offer(self, score: Score, epoch: int) -> bool:
        if score.better_than(self.score):
            self.score, self.epoch = score, epoch
            self.state = copy.deepcopy(self.module.state_dict())
            return True
        return False

    def restore(self) -> None:
        if self.state:
            self.module.load_state_dict(self.state)


class WeightAverage:
    """An exponential moving average of a module's weights (timm's ModelEmaV2 rule, with its warm-up: the decay
    grows as (1 + n) / (10 + n) up to `decay`, so early averages are not stuck at the starting weights)."""

    def __init__(self, module: nn.Module, decay: float):
        self.module, self.decay, self.updates = module, decay, 0
        self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, value in self.module.state_dict().items():
            average = self.state[name]
            if average.is_floating_point():
                average.lerp_(value.detach(), 1.0 - decay)
            else:
                average.copy_(value)

    def swap(self) -> None:
        """Exchange the module's weights and the averaged ones (twice puts everything back)."""
        current = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self.module.load_state_dict(self.state)
        self.state = current

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.state, "__updates__": torch.tensor(self.updates)}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.updates = int(tensors.pop("__updates__"))
        self.state = tensors


@dataclass
class Resume:
    """A loaded checkpoint, and the order of the run's phases (to tell a finished phase from a pending one)."""

    state: dict
    tensors: dict
    phases: list[str]

    def is_past(self, name: str) -> bool:
        return self.phases.index(self.state["phase"]) > self.phases.index(name)


@dataclass
class PhaseContext:
    """What every phase needs besides the model and the data."""

    cfg: TrainConfig
    device: torch.device
    history: History
    quiet: bool
    notes: list[str]
    checkpoint: object = None  # a training.checkpoint.Checkpoint on the process that writes
    resume: Resume | None = None
    dist: Dist = field(default_factory=Dist)
    summary: dict = field(default_factory=dict)  # what a recipe reports beyond its scores (a refit's choices)
    budget: object = None  # a training.budget.Replanner while a --budget run re-plans phase 2 as it goes

    def evaluate(self, forward, inputs, labels: np.ndarray, batch_size: int = 256) -> Score | None:
        """Score of `forward` on this process's share, summed over all processes (None: nothing to score).
        Every process must call it, even with an empty share."""
        score = evaluate_logits(forward, inputs, labels, self.device, batch_size)[0] if len(labels) else None
        if not self.dist.active:
            return score
        n = len(labels)
        loss_sum, correct, count = self.dist.sum([score.loss * n if n else 0.0, score.accuracy * n if n else 0.0, float(n)])
        return Score(loss_sum / count, correct / count) if count else None
