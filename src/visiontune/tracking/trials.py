"""A recipe search as MLflow runs: one parent run for the search, one nested run per trial.

The hook a search calls, whether tracking is on or not:

    with search_run(track_config, "budget search") as search:
        for params in candidates:
            with search.nested_trial(params) as log:
                ...train...
                log({"val.top1": 0.91}, step=epoch)   # step optional

With tracking off, on a process other than rank 0, or once the tracker has failed (said once, on stderr), every call
does nothing: a search is never stopped by its tracker.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from visiontune.config import TrackConfig
from visiontune.errors import TrackingError
from visiontune.tracking.connect import is_rank_zero, mlflow_errors
from visiontune.tracking.run_log import TrackedRun, log_params_and_metrics, start_run

LogFn = Callable[..., None]


def _no_log(metrics: dict, step: int | None = None) -> None:
    return None


class SearchRun:
    """The parent run of a search (`tracked` is None when nothing is tracked)."""

    def __init__(self, cfg: TrackConfig, name: str, params: dict | None = None):
        self.cfg = cfg
        self.client = None
        self.tracked: TrackedRun | None = None
        self.trials = 0
        if cfg.track is None or not is_rank_zero():
            return
        self._guard(lambda: self._open(name, params or {}))

    def _open(self, name: str, params: dict) -> None:
        self.client, self.tracked = start_run(self.cfg, "search", None, name)
        log_params_and_metrics(self.client, self.tracked, params, {}, self.cfg.param_chars)

    def _guard(self, work: Callable[[], None]) -> None:
        try:
            work()
        except TrackingError as exc:
            print(f"visiontune: warning: tracking off for the rest of this search: {exc}", file=sys.stderr)
            self.tracked = None

    @contextlib.contextmanager
    def nested_trial(self, params: dict, name: str | None = None) -> Iterator[LogFn]:
        """A nested run for one trial, with `params`; yields `log(metrics, step=None)`. The trial's run ends FINISHED,
        or FAILED when the block raises (the exception goes on)."""
        self.trials += 1
        if self.tracked is None:
            yield _no_log
            return
        child: list[TrackedRun] = []
        trial_cfg = _without_name(self.cfg)
        self._guard(lambda: child.append(start_run(trial_cfg, "trial", None, name or f"trial {self.trials}",
                                                   parent_id=self.tracked.run_id)[1]))
        if not child:
            yield _no_log
            return
        run = child[0]
        self._guard(lambda: log_params_and_metrics(self.client, run, params, {}, self.cfg.param_chars))

        def log(metrics: dict, step: int | None = None) -> None:
            if self.tracked is None:
                return
            self._guard(lambda: _log_step(self.client, run, metrics, step))

        status = "FAILED"
        try:
            yield log
            status = "FINISHED"
        finally:
            if self.tracked is not None:
                self._guard(lambda: self.client.set_terminated(run.run_id, status))

    def close(self, status: str = "FINISHED") -> None:
        if self.tracked is not None:
            self._guard(lambda: self.client.set_terminated(self.tracked.run_id, status))
            self.tracked = None


@contextlib.contextmanager
def search_run(cfg: TrackConfig | None, name: str = "search", params: dict | None = None) -> Iterator[SearchRun]:
    """The parent run of a search; see the module's example. `cfg` None: nothing is tracked."""
    search = SearchRun(cfg or TrackConfig(), name, params)
    status = "FAILED"
    try:
        yield search
        status = "FINISHED"
    finally:
        search.close(status)


def _log_step(client, run: TrackedRun, metrics: dict, step: int | None) -> None:
    import time

    from mlflow.entities import Metric

    from visiontune.tracking.flatten import flat_metrics

    now = int(time.time() * 1000)
    points = [Metric(k, v, now, step or 0) for k, v in flat_metrics(metrics).items()]
    with mlflow_errors(run.uri):
        client.log_batch(run.run_id, metrics=points)


def _without_name(cfg: TrackConfig) -> TrackConfig:
    """The search's settings for its trials: their names are their own, not the search's --run-name."""
    from visiontune.settings import override

    return override(cfg, run_name=None)
