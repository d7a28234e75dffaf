"""Serving: an HTTP API (FastAPI on uvicorn) and a web page for a run directory or an exported model.

`create_app(classifier, config)` builds the application; `run(model, config)` loads a model and serves it.
`visiontune.serve` is both this package and the API verb (`visiontune.serve(run, port=8000)`).
"""

from visiontune._verb_package import make_callable
from visiontune.serve.app import create_app
from visiontune.serve.model import describe, load_model
from visiontune.serve.server import run

__all__ = ["create_app", "describe", "load_model", "run"]

make_callable(__name__, "serve")
