"""`models:/NAME/VERSION` and `models:/NAME@alias`: a model in MLflow's registry, fetched once into a local cache as
the ONNX file `export --register` logged (labels and preprocessing in its metadata), so every loader takes it as
it takes any .onnx file.

The registry is the one at $MLFLOW_TRACKING_URI. A version never changes once registered, so it is downloaded
once per server; an alias is asked for each time, since it moves.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from visiontune.config import MODEL_URI_PREFIX
from visiontune.errors import ModelError, TrackingError
from visiontune.tracking.connect import check_reachable, mlflow_errors, mlflow_module, tracking_uri

CACHE_ENV = "XDG_CACHE_HOME"


def is_registered_uri(path: str | Path) -> bool:
    return str(path).startswith(MODEL_URI_PREFIX)


def parse(uri: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of models:/NAME/VERSION or models:/NAME@alias; ModelError otherwise."""
    rest = uri[len(MODEL_URI_PREFIX):]
    name, sep, alias = rest.partition("@")
    if sep and name and alias and "/" not in rest:
        return name, None, alias
    name, sep, version = rest.partition("/")
    if sep and name and version.isdigit():
        return name, version, None
    raise ModelError(f"{uri}: expected models:/NAME/VERSION (a number) or models:/NAME@ALIAS")


def cache_root(uri: str | None) -> Path:
    base = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache")
    server = hashlib.sha256((uri or "default").encode()).hexdigest()[:12]
    return base / "visiontune" / "registry" / server


def fetch_registered(model_uri: str) -> Path:
    """The local ONNX file of a registered model version (downloaded on first use)."""
    name, version, alias = parse(model_uri)
    uri = tracking_uri(None)
    try:
        mlflow = mlflow_module()
        check_reachable(uri)
        with mlflow_errors(uri):
            client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
            if alias is not None:
                version = str(client.get_model_version_by_alias(name, alias).version)
            else:
                client.get_model_version(name, version)  # a missing version is named here, not as a download error
            target = cache_root(uri) / name / version
            if not target.is_dir():
                _download(mlflow, f"{MODEL_URI_PREFIX}{name}/{version}", uri, target)
    except TrackingError as exc:  # a model that cannot be had is a model error to predict, bench and serve
        raise ModelError(f"{model_uri}: {exc}") from None
    found = sorted(target.rglob("*.onnx"))
    if not found:
        raise ModelError(f"{model_uri}: version {version} holds no ONNX model (register one with `visiontune export "
                         f"RUN --register {name}`)")
    return found[0]


def _download(mlflow, model_uri: str, uri: str | None, target: Path) -> None:
    """Into a temporary folder beside `target`, renamed at the end: a reader never sees half a model, and several
    server workers fetching at once leave one copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(staging), tracking_uri=uri)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # another worker's copy arrived first otherwise
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
