"""The teacher of `visiontune distill`: a run or an ensemble directory, loaded with `inference`.

It follows `training.distill.Teacher`: the trainer (which never imports `inference`) hands it the student's
uint8 training crops, and it returns its logits for them, each crop fitted to the teacher's own input size
and normalisation (for an ensemble, to every member's). A run teacher gives its raw logits; an ensemble gives
log of its soft vote (the members' calibrated probabilities, weighted). Before any of that, `prepare` checks
that the teacher knows the student's classes and never trained on the student's test images.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from visiontune.config import SPLITS, DistillConfig
from visiontune.data.index import load_dataset
from visiontune.data.split import Split
from visiontune.data.transforms import Preprocess
from visiontune.errors import ConfigError, ModelError
from visiontune.inference.classifier import Classifier
from visiontune.inference.ensemble import describe_label_difference, fit_crops
from visiontune.models.bundle import read_meta
from visiontune.models.manifest import read_manifest
from visiontune.models.run_dir import RunDir


def model_identity(folder: Path) -> str:
    """Digest of what a run's or an ensemble's outputs depend on: its model.json and weights, or for an
    ensemble its ensemble.json and model.json and every member's identity."""
    run = RunDir(folder)
    h = hashlib.blake2b(digest_size=16)
    for path in (run.ensemble, run.meta, run.weights):
        if path.is_file():
            h.update(path.name.encode())
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    if run.is_ensemble:
        for member in read_manifest(run.path)[1]:
            h.update(model_identity(member.path).encode())
    return h.hexdigest()


class RunTeacher:
    """A run or ensemble directory as a distillation teacher."""

    def __init__(self, path: str | Path, backend: str = DistillConfig.teacher_backend, threads: int = 0):
        self.path = Path(path)
        if not self.path.is_dir():
            raise ModelError(f"--teacher {path}: no such run or ensemble directory (a teacher is a run folder or an "
                             f"ensemble folder, not an exported file)")
        self.meta = read_meta(self.path)
        self.backend, self.threads = backend, threads
        self.identity = f"{model_identity(self.path)}:{backend}"
        self.columns: np.ndarray | None = None
        self._classifier = None

    @property
    def classifier(self):
        """Loaded on the first logits: a run whose teacher logits are all cached never loads the teacher."""
        if self._classifier is None:
            self._classifier = Classifier.load(self.path, self.backend, threads=self.threads)
        return self._classifier

    def prepare(self, classes: list[str], split: Split) -> list[str]:
        labels = self.meta.labels
        if set(labels) != set(classes):
            raise ModelError(f"--teacher {self.path}: it knows other classes than the data "
                             f"({describe_label_difference(labels, list(classes), 'the teacher', 'the data')}); "
                             f"distil on data with the teacher's classes")
        self.columns = np.array([labels.index(name) for name in classes])
        kind = "ensemble" if RunDir(self.path).is_ensemble else "run"
        return [f"distilled from the {kind} {self.path}"] + self._check_leakage(split)

    def _check_leakage(self, split: Split) -> list[str]:
        """The teacher must not have trained (or been tuned) on the student's test images: the student would
        learn their labels through it, and its test score would leak. The student's validation images only
        pick its best epoch, so an overlap there is a note."""
        path = RunDir(self.path).split
        if not path.is_file():
            return [f"the teacher {self.path} has no {RunDir.SPLIT}: nothing shows it did not train on this run's "
                    f"test images"]
        teacher = load_dataset(path)
        roles = {str(teacher.abspath(i).resolve()): int(teacher.splits[i]) for i in range(len(teacher))}
        ds = split.dataset

        def overlap(name: str, teacher_roles: tuple[str, ...]) -> list[str]:
            wanted = {SPLITS.index(r) for r in teacher_roles}
            return sorted(p for p in (str(ds.abspath(i).resolve()) for i in split.indices(name)) if roles.get(p) in wanted)

        test = overlap("test", ("train", "val"))
        if test:
            raise ConfigError(f"--teacher {self.path} trained or validated on {len(test)} of this run's test images "
                              f"(e.g. {test[0]}), so the student's test score would leak; distil on the teacher's "
                              f"own split: `visiontune distill --teacher {self.path} {path}`")
        val = overlap("val", ("train",))
        if val:
            return [f"the teacher trained on {len(val)} of this run's validation images: the validation score that "
                    f"picks the student's best epoch is optimistic"]
        return []

    def logits(self, crops: np.ndarray, spec: Preprocess) -> np.ndarray:
        if self.columns is None:
            raise RuntimeError("RunTeacher.logits before prepare")  # a bug, not a user error
        if self.classifier.is_ensemble:  # every member gets the crop fitted to it directly
            z = self.classifier.engine.logits(crops, spec)
        else:
            z = self.classifier.logits(fit_crops(crops, spec, self.classifier.preprocess))
        return np.asarray(z, dtype=np.float32)[:, self.columns]


def load_teacher(cfg: DistillConfig) -> RunTeacher | None:
    """The teacher `cfg` names (None when it names none)."""
    if not cfg.teacher:
        return None
    return RunTeacher(cfg.teacher, cfg.teacher_backend)
