"""`train --budget B --ray`: the search's TPE trials on a Ray cluster, several at once; Ray is imported here only.

The driver keeps everything a local search keeps: the Optuna study (its journal in the run, so `--resume` continues
it), the asking, the telling, the rows and the choice. Each Ray worker holds one copy of the stage's frozen model,
its top stages and its cached views, shipped once through Ray's object store (no shared file system needed), and runs
a trial's folds exactly as the local search does. A worker reports each held-out epoch score to the driver's study
through Optuna's gRPC storage proxy, served by the driver for the search, so the median rule prunes a trial on a
worker as it would here. A worker returns the trial's out-of-fold predictions, so the chosen trial's folds are not
fitted again by the refit. What a trial costs is timed from the trials themselves, so the budget holds as locally.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
import warnings

import numpy as np
import torch

from visiontune.config import TrainConfig
from visiontune.errors import ConfigError
from visiontune.models.run_dir import RunDir
from visiontune.training.crossfit import OutOfFold, crossfit
from visiontune.training.history import History
from visiontune.training.loops import make_loss
from visiontune.training.phases import PhaseContext
from visiontune.training.trials import TrialContext, pruner

try:  # this module is imported only for --ray
    import ray
except ImportError:
    raise ConfigError("--ray needs Ray: pip install 'visiontune[ray]' here and on every node of the cluster") from None

# Two threads a trial was the fastest per trial on a 2-core machine; a cluster's cores then go to more trials at once.
DEFAULT_TRIAL_THREADS = 2


def trials_on_ray(search, stage, study, epochs: int, on_trial) -> None:
    """The TPE trials of `stage` (a training.search.RecipeSearch's) on Ray workers, as many at once as there are
    workers, until the budget, the trial cap or the study's size says stop."""
    started_here = not ray.is_initialized()
    if started_here:
        address = search.cfg.search_ray
        ray.init(address=None if address in ("", "local") else address, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=False)
    server, host, port = _storage_proxy(search.storage)
    try:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        threads = search.cfg.search_ray_threads or min(DEFAULT_TRIAL_THREADS, cpus)
        # One object for all of it: pickled together, `top` stays a part of `net` on the worker.
        payload = ray.put((stage.net, stage.top, stage.initial, stage.pool, search.y_pool))
        remote = ray.remote(num_cpus=threads)(TrialWorker)

        def start_worker():
            return remote.remote(payload, host, port, threads, len(search.sets.train), search.num_classes,
                                 str(search.run_dir.path))

        workers = [start_worker() for _ in range(max(1, cpus // threads))]
        search.ctx.notes.append(f"search: TPE trials on Ray ({len(workers)} worker(s) x {threads} thread(s), "
                                f"{cpus} CPUs)")
        _dispatch(search, stage, study, epochs, on_trial, workers, start_worker)
    finally:
        server.stop(None)
        if started_here:
            ray.shutdown()


def _dispatch(search, stage, study, epochs: int, on_trial, workers: list, start_worker) -> None:
    done = sum(r["model"] == stage.model and r["views"] == stage.views for r in search.rows)
    idle, running = list(workers), {}
    while True:
        while idle and search.may_start(stage, study, epochs, None, done, running=len(running)):
            trial, params, trial_cfg = search.ask(stage, study, epochs)
            worker = idle.pop()
            # The trial's id, not its number: the worker's study is the same one, reached through the proxy.
            ref = worker.run.remote(study.study_name, trial._trial_id, trial_cfg)
            running[ref] = (worker, trial, params, trial_cfg, time.perf_counter())
        if not running:
            return
        [ref], _ = ray.wait(list(running), num_returns=1)
        worker, trial, params, trial_cfg, began = running.pop(ref)
        try:
            oof, lost = _writable(ray.get(ref)), None
        except ray.exceptions.RayActorError as exc:  # its node or process died: the trial is lost, not the search
            oof, lost = None, exc
        # A lost worker is replaced (its model and views come from the object store again); its trial is a row.
        idle.append(start_worker() if lost else worker)
        if lost:
            search.ctx.notes.append(f"search: trial {trial.number} lost with its Ray worker ({type(lost).__name__})")
        search.tell(stage, study, trial, params, trial_cfg, oof, time.perf_counter() - began, on_trial,
                    failed=lost is not None)
        done += 1


def _writable(oof: OutOfFold | None) -> OutOfFold | None:
    """Ray hands numpy arrays back read-only (zero copy from its object store); the refit's choices are the driver's."""
    if oof is None:
        return None
    return dataclasses.replace(oof, positions=np.array(oof.positions), logits=np.array(oof.logits),
                               labels=np.array(oof.labels))


def _storage_proxy(storage):
    """(a started gRPC server in front of `storage`, the host and port workers reach it on)."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    api_pb2_grpc.add_StorageServiceServicer_to_server(OptunaStorageProxyService(storage), server)
    port = server.add_insecure_port("0.0.0.0:0")
    server.start()
    return server, _reachable_host(), port


def _reachable_host() -> str:
    """This node's address as the cluster sees it (loopback for a Ray on this machine alone)."""
    try:
        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001 - any failure to learn it leaves the loopback, right for a local Ray
        return socket.gethostbyname("localhost")


class TrialWorker:
    """One Ray worker: a stage's model and cached views, and the folds of one trial at a time."""

    def __init__(self, payload, host: str, port: int, threads: int, n_train: int, num_classes: int, run: str):
        from optuna.storages import GrpcStorageProxy

        torch.set_num_threads(threads)
        # The cached views arrive read-only from Ray's object store; the trials only read them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.net, self.top, self.initial, self.pool, self.y_pool = payload
        self.n_train, self.num_classes, self.run_dir = n_train, num_classes, RunDir(run)
        self.storage = GrpcStorageProxy(host=host, port=port)

    def run(self, study_name: str, trial_id: int, cfg: TrainConfig) -> OutOfFold | None:
        """The trial's out-of-fold predictions; None when the study pruned it."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.load_study(study_name=study_name, storage=self.storage, pruner=pruner())
        trial = optuna.trial.Trial(study, trial_id)
        self.net.load_state_dict(self.initial)
        base = PhaseContext(cfg, torch.device("cpu"), History(self.run_dir, True, write=False), True, [])
        try:
            return crossfit(self.net, self.top, cfg, self.pool, self.y_pool, self.n_train,
                            lambda y: make_loss(cfg, y, self.num_classes), TrialContext(base, trial), refit=False)
        except optuna.TrialPruned:
            return None
