"""Several processes, one run: `torchrun --nproc_per_node=N -m visiontune.cli train DATA` (or multi-node torchrun).

Each process trains on its own shard of the training images (DistributedSampler's rule: every rank gets the
same number, padding by wrap-around), gradients are averaged by DistributedDataParallel, validation is
summed over ranks, and only rank 0 writes files or logs. Without torchrun all of this is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def train_shard(self, indices: np.ndarray) -> np.ndarray:
        """This rank's share, all ranks equal in size (DistributedSampler pads by wrapping around), so
        every rank runs the same number of steps and DDP's collective calls line up."""
        if not self.active or not len(indices):
            return indices
        per_rank = -(-len(indices) // self.world)
        padded = np.resize(indices, per_rank * self.world)
        return padded[self.rank::self.world]

    def eval_shard(self, indices: np.ndarray) -> np.ndarray:
        """This rank's share for evaluation: no padding, so summed counts are exact."""
        return indices[self.rank::self.world] if self.active else indices

    def sum(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def setup() -> Dist:
    """Join the process group torchrun describes in the environment; a plain run gets Dist()."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    # Processes on one machine share its cores: split them instead of each taking all.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
