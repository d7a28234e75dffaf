"""Experiment tracking (MLflow): finished folders as tracked runs, exports as registered models, and the hook a
recipe search calls for nested runs. MLflow is an optional extra (`visiontune[tracking]`), imported only here and in
`models/registered.py`, and only when asked for."""

from __future__ import annotations

from visiontune.tracking.trials import SearchRun, search_run

__all__ = ["SearchRun", "search_run"]
