"""The HTTP API and the web page: `create_app(classifier, config)` returns the FastAPI application.

Request path of a prediction: API key (401) -> what the headers say: size (413), type (415) -> a place in
the queue (503) -> the body, read under size and time limits (413, 408) -> decode on a thread pool (415,
422) -> the micro-batcher (one model call for many requests) -> top-k JSON.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Security
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles

from visiontune.config import ServeConfig, default_workers
from visiontune.errors import ImageDecodeError, ModelError
from visiontune.inference import Classifier
from visiontune.serve import docs, errors, uploads
from visiontune.serve.batcher import MicroBatcher
from visiontune.serve.errors import ApiError
from visiontune.serve.model import can_explain, describe, model_streams
from visiontune.version import __version__

log = logging.getLogger("visiontune.serve")
STATIC = Path(__file__).parent / "static"
# The page may talk to its own origin only: no CDN, no fonts, no analytics, nothing inline.
PAGE_POLICY = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

_IMAGE = {"type": "string", "format": "binary"}
ONE_IMAGE = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": _IMAGE}, "required": ["file"]}},
    "image/jpeg": {"schema": _IMAGE}, "image/png": {"schema": _IMAGE}, "application/octet-stream": {"schema": _IMAGE}}}}
MANY_IMAGES = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "properties": {"file": {"type": "array", "items": _IMAGE}}, "required": ["file"]}}}}}


def _errors(*statuses: int) -> dict:
    example = {"error": {"code": "…", "message": "…"}}
    return {s: {"description": errors.CODES[s], "content": {"application/json": {"example": example}}} for s in statuses}


class AccessLog:
    """One log line per request, with its status and latency (uvicorn's own access log is turned off)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # what the client gets if the application raises before responding

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            client = scope.get("client") or ("-", 0)
            # raw_path is still percent-encoded, so a crafted path cannot break the log line
            path = scope.get("raw_path", b"").decode("latin-1") or scope["path"]
            log.info('%s:%s "%s %s" %d %.1f ms', client[0], client[1], scope["method"], path, status,
                     (time.perf_counter() - start) * 1000)


def _key_check(expected: str):
    digest = hashlib.sha256(expected.encode()).digest()
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="the server's --api-key")
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key as a bearer token")

    def check(key: str | None = Security(header), token: HTTPAuthorizationCredentials | None = Security(bearer)):
        given = key if key is not None else (token.credentials if token else None)
        if given is None:
            raise ApiError(401, "an API key is required (X-API-Key header or Authorization: Bearer)",
                           headers={"WWW-Authenticate": "Bearer"})
        # Both sides hashed first: compare_digest is constant-time only for inputs of equal length.
        if not hmac.compare_digest(hashlib.sha256(given.encode()).digest(), digest):
            raise ApiError(401, "wrong API key", headers={"WWW-Authenticate": "Bearer"})

    return check


def create_app(clf: Classifier, cfg: ServeConfig | None = None) -> FastAPI:
    cfg = cfg or ServeConfig()
    batcher = MicroBatcher(clf.probabilities_and_scores, max_batch=cfg.max_batch, max_wait_ms=cfg.max_wait_ms,
                           capacity=cfg.queue_size, streams=model_streams(cfg))
    decoder = ThreadPoolExecutor(default_workers(cfg.decode_threads), thread_name_prefix="decode")
    bodies = uploads.BodyBudget(cfg.body_budget_bytes)
    pixels = uploads.PixelBudget(cfg.decode_budget_pixels)
    explainer = ThreadPoolExecutor(1, thread_name_prefix="explain")  # Grad-CAM is heavy: one at a time
    info = {**describe(clf), "limits": {"max_body_bytes": cfg.max_body_bytes, "max_batch_files": cfg.max_batch_files,
                                        "max_pixels": cfg.max_pixels, "top_k": cfg.top_k},
            "auth": cfg.api_key is not None}
    spec = clf.preprocess
    state = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        state["ready"] = True
        yield
        state["ready"] = False
        await batcher.stop()
        decoder.shutdown(wait=True)
        explainer.shutdown(wait=True)

    app = FastAPI(title="visiontune", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Image classification with a visiontune model. Errors are "
                              '`{"error": {"code", "message"}}` with the HTTP status.')
    app.state.batcher = batcher
    app.state.serving = state
    errors.install(app, cfg.retry_after_s)
    app.add_middleware(AccessLog)

    def top_k_of(top_k: int | None) -> int:
        return min(cfg.top_k if top_k is None else top_k, len(clf.labels))

    def answer(name: str, probabilities: np.ndarray, score, top_k: int) -> dict:
        # The Classifier's own top-k, entropy, "uncertain" and "unknown" rules, so served answers equal `predict`'s.
        out = clf._prediction(name, probabilities, top_k, score).to_dict()
        out.pop("error")
        return out

    TopK = Query(None, ge=1, le=1000, description=f"labels returned (default {cfg.top_k})")
    secured = [Depends(_key_check(cfg.api_key))] if cfg.api_key else []
    v1 = APIRouter(prefix="/v1", dependencies=secured)

    @v1.post("/predict", openapi_extra=ONE_IMAGE, summary="Classify one image",
             responses=_errors(400, 401, 408, 413, 415, 422, 503))
    async def predict(request: Request, top_k: int | None = TopK) -> JSONResponse:
        k = top_k_of(top_k)
        uploads.check_headers(request, cfg.max_body_bytes)
        with bodies.account() as account:
            (upload,) = await uploads.read_images(request, cfg.max_body_bytes, cfg.body_timeout_s, 1, account)
            with batcher.reserve(1):  # a place in the queue only once the body is in: slow clients hold none
                crop = await uploads.decode(upload, spec, cfg.max_pixels, decoder, pixels)
                probabilities, scores = await batcher.submit(crop[None])
        return JSONResponse(answer(upload.name, probabilities[0], None if scores is None else scores[0], k))

    @v1.post("/predict/batch", openapi_extra=MANY_IMAGES, summary="Classify several images",
             description=f"Up to {cfg.max_batch_files} `file` fields. An image that cannot be read gets an "
                         "`error` in its place; the others are still classified.",
             responses=_errors(400, 401, 408, 413, 415, 503))
    async def predict_batch(request: Request, top_k: int | None = TopK) -> JSONResponse:
        k = top_k_of(top_k)
        uploads.check_headers(request, cfg.max_body_bytes, multipart_only=True)
        with bodies.account() as account, batcher.reserve(0) as places:
            files = await uploads.read_images(request, cfg.max_body_bytes, cfg.body_timeout_s, cfg.max_batch_files,
                                              account)
            places.grow(len(files))
            decoded = await asyncio.gather(*(uploads.decode(f, spec, cfg.max_pixels, decoder, pixels) for f in files),
                                           return_exceptions=True)
            crops = [d for d in decoded if isinstance(d, np.ndarray)]
            probabilities, scores = await batcher.submit(np.stack(crops)) if crops else ([], None)
            probabilities, scores = iter(probabilities), iter(scores if scores is not None else [None] * len(crops))
        results = []
        for upload, d in zip(files, decoded):
            if isinstance(d, ApiError):
                results.append({"source": upload.name, "error": {"code": d.code, "message": d.detail}})
            elif isinstance(d, BaseException):
                raise d
            else:
                results.append(answer(upload.name, next(probabilities), next(scores), k))
        return JSONResponse({"results": results})

    @v1.post("/explain", openapi_extra=ONE_IMAGE, summary="Grad-CAM overlay (PNG) of one image",
             response_class=Response, responses={200: {"content": {"image/png": {}}},
                                                 **_errors(400, 401, 408, 409, 413, 415, 422, 503)})
    async def explain(request: Request, target: str | None = Query(None, description="class to explain "
                                                                   "(default: the top prediction)")) -> Response:
        if not can_explain(clf):
            raise ApiError(409, "Grad-CAM needs the PyTorch weights of one network: this server runs an exported "
                                "model file (or an ensemble); serve the run directory to explain")
        if target is not None and target not in clf.labels:
            raise ApiError(400, f"target {target[:100]!r} is not one of the model's labels (GET /v1/model lists them)")
        uploads.check_headers(request, cfg.max_body_bytes)
        with bodies.account() as account:
            (upload,) = await uploads.read_images(request, cfg.max_body_bytes, cfg.body_timeout_s, 1, account)
            with batcher.reserve(1):
                await uploads.decode(upload, spec, cfg.max_pixels, decoder, pixels)  # refuses bad images like /predict
                png = await asyncio.get_running_loop().run_in_executor(explainer, _overlay_png, clf, upload, target)
        return Response(png, media_type="image/png")

    @v1.get("/model", summary="Labels, preprocessing, headline metrics, versions", responses=_errors(401))
    async def model() -> dict:
        return info

    app.include_router(v1)

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the model is loaded and the server is not shutting down",
             responses=_errors(503))
    async def readyz() -> dict:
        if not state["ready"]:
            raise ApiError(503, "not ready (starting or shutting down)", code="not_ready")
        # How well micro-batching works: images per model call rises with the load.
        return {"status": "ready", "in_flight": batcher.reserved, "model_calls": batcher.batches,
                "images": batcher.images}

    page = (STATIC / "index.html").read_text()

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY, "X-Content-Type-Options": "nosniff"})

    @app.get("/docs", include_in_schema=False)
    async def api_docs() -> HTMLResponse:
        return HTMLResponse(docs.render(app.openapi()),
                            headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _overlay_png(clf: Classifier, upload: uploads.Upload, target: str | None) -> bytes:
    from PIL import Image

    try:
        e = clf.explain(upload.data, target=target)
    except ImageDecodeError as exc:
        raise uploads.decode_error(upload.name, exc) from None
    except ModelError:
        raise ApiError(409, "Grad-CAM is not available for this model") from None
    buffer = io.BytesIO()
    Image.fromarray(e.overlay).save(buffer, format="PNG")
    return buffer.getvalue()
