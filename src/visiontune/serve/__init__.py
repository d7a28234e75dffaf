"""Serving: an HTTP API (FastAPI on uvicorn) and a web page for a run directory or an exported model.

`serve(model, **settings)` loads a model and serves it; `create_app(classifier, config)` builds the application.
"""

from visiontune.serve.app import create_app
from visiontune.serve.model import describe, load_model
from visiontune.serve.server import run, serve

__all__ = ["create_app", "describe", "load_model", "run", "serve"]
