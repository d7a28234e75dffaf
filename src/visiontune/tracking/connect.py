"""Reaching MLflow: the import (an optional extra), the tracking URI, a quick check that its server answers, and
MLflow's own failures turned into one line.

MLflow's HTTP client retries a refused connection for about two minutes before it gives up; a server that is down
is asked once here, with a short timeout, so the user hears about it in seconds.
"""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from typing import Iterator

from visiontune.config import TRACKING_URI_ENV
from visiontune.errors import TrackingError

INSTALL_HINT = "pip install 'visiontune[tracking]'"
HEALTH_TIMEOUT_S = 5.0


def mlflow_module():
    """The mlflow package, or a TrackingError saying how to install it."""
    try:
        import mlflow
    except ImportError:
        raise TrackingError(f"MLflow is not installed: {INSTALL_HINT}") from None
    return mlflow


def tracking_uri(given: str | None) -> str | None:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else None (MLflow's default: ./mlflow.db)."""
    return given or os.environ.get(TRACKING_URI_ENV) or None


def check_reachable(uri: str | None) -> None:
    """A TrackingError at once when an http(s) tracking server does not answer its health check."""
    if not uri or not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        return  # it answered: a proxy or an older server without /health; MLflow's own calls say more
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"the MLflow tracking server at {uri} does not answer ({reason})") from None


@contextlib.contextmanager
def mlflow_errors(uri: str | None) -> Iterator[None]:
    """MLflow's exceptions (and the HTTP ones under them) as one TrackingError line naming the server."""
    try:
        yield
    except TrackingError:
        raise
    except Exception as exc:  # noqa: BLE001 (MLflow raises its own, requests' and OSError; all mean the same here)
        mlflow = mlflow_module()
        if not isinstance(exc, (mlflow.exceptions.MlflowException, OSError)) and "requests" not in type(exc).__module__:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = uri or "MLflow's default store (./mlflow.db)"
        raise TrackingError(f"MLflow at {where}: {first[:300]}") from None


def client(uri: str | None):
    """An MlflowClient for `uri`, once its server has answered."""
    mlflow = mlflow_module()
    check_reachable(uri)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def is_rank_zero() -> bool:
    """False on every process of a torchrun job but rank 0, which alone writes and reports the run."""
    return os.environ.get("RANK", "0") == "0"
