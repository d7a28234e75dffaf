"""Resume state: after every epoch, everything needed to continue as if never stopped.

checkpoint/state.safetensors is one file: the tensors (model, best model so far, optimizer moments, torch RNG)
and, in its metadata, the rest as JSON (phase, epoch, scheduler, numpy RNG, best score, history length). It is
written to a temporary name and renamed, so a kill at any instant leaves either the previous complete checkpoint
or the new one: never the tensors of one epoch with the state of another.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from visiontune.errors import ConfigError
from visiontune.files import disk_full, is_disk_full, temporary_name
from visiontune.models.onnx_graph import first_line
from visiontune.models.run_dir import RunDir
from visiontune.training.phases import Score

TENSORS = "state.safetensors"
_META_KEY = "visiontune_state"


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for param_id, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, param_id, name = key.split(".", 2)
            state.setdefault(int(param_id), {})[name] = value
    for key, value in meta["scalars"].items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from."""


class Checkpoint:
    """Reads and writes one run's resume state."""

    def __init__(self, run_dir: Path):
        self.folder = RunDir(run_dir).checkpoint
        self.kept: dict[str, torch.Tensor] = {}  # tensors saved with every later checkpoint (see `keep`)

    def keep(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Save `state` under `name` with every checkpoint from now on (a model an earlier phase left, say)."""
        self.kept.update({f"kept.{name}.{k}": v.detach().cpu().contiguous() for k, v in state.items()})

    @staticmethod
    def kept_from(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
        prefix = f"kept.{name}."
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    def exists(self) -> bool:
        return (self.folder / TENSORS).is_file()

    def save(self, *, phase: str, epoch: int, finished: bool, model: nn.Module, optimizer, scheduler, plateau,
             rng: np.random.Generator, best, stale: int, history_rows: int) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best.state.items()})
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
        tensors.update(self.kept)
        tensors["torch_rng"] = torch.get_rng_state()
        state = {
            "phase": phase, "epoch": epoch, "finished": finished, "stale": stale, "history_rows": history_rows,
            "optimizer": opt_meta,
            "scheduler": _scheduler_state(scheduler), "plateau": _scheduler_state(plateau),
            "rng": rng.bit_generator.state,
            "best": {"epoch": best.epoch, "loss": best.score.loss if best.score else None,
                     "accuracy": best.score.accuracy if best.score else None},
        }
        tmp = temporary_name(self.folder / TENSORS)
        try:
            save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(state, default=_json_default)})
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, self.folder / TENSORS)
        except BaseException as exc:
            full = is_disk_full(exc, self.folder)
            tmp.unlink(missing_ok=True)  # a full disk must not also keep the space a half checkpoint took
            if full:
                run = self.folder.parent
                intact = (f"the checkpoint of the epoch before is intact: free some space, then `visiontune train "
                          f"--resume {run}`" if (self.folder / TENSORS).exists() else "no epoch was saved yet")
                raise disk_full(self.folder / TENSORS, intact) from None
            raise

    def load(self) -> tuple[dict, dict[str, torch.Tensor]]:
        from safetensors import safe_open

        path = self.folder / TENSORS
        try:
            with safe_open(str(path), framework="pt") as fh:
                state = json.loads((fh.metadata() or {})[_META_KEY])
                return state, {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # truncated, foreign or hand-edited: say so instead of a traceback
            raise CheckpointError(f"{path}: unreadable checkpoint ({first_line(exc)[:160]}); start the run again "
                                  f"with --overwrite") from None

    def remove(self) -> None:
        (self.folder / TENSORS).unlink(missing_ok=True)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


def restore(state: dict, tensors: dict[str, torch.Tensor], *, model: nn.Module, optimizer, scheduler, plateau,
            rng: np.random.Generator, best) -> None:
    """Put model, optimizer, schedules, RNGs and best-so-far back as they were after the saved epoch."""
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer.load_state_dict(_unflatten_optimizer(tensors, state["optimizer"]))
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    if plateau is not None and state["plateau"] is not None:
        plateau.load_state_dict(state["plateau"])
    rng.bit_generator.state = state["rng"]
    torch.set_rng_state(tensors["torch_rng"])
    best.state = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
    if state["best"]["accuracy"] is not None:
        best.score = Score(state["best"]["loss"], state["best"]["accuracy"])
        best.epoch = state["best"]["epoch"]


def _scheduler_state(scheduler) -> dict | None:
    if scheduler is None:
        return None
    return {k: v for k, v in scheduler.state_dict().items() if not callable(v)}


def _json_default(value):
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")
