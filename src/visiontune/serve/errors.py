"""Every error leaves the server as JSON `{"error": {"code", "message"}}` with its HTTP status, and never
with a stack trace: those go to the server's log."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from visiontune.serve.batcher import QueueFull

CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
         408: "request_timeout", 409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
         422: "undecodable_image", 429: "too_many_requests", 500: "internal_error", 503: "unavailable"}


class ApiError(HTTPException):
    """An error the client caused or can retry; a subclass of Starlette's HTTPException so that FastAPI's
    body parsing re-raises it instead of turning it into a generic 400."""

    def __init__(self, status: int, message: str, *, code: str | None = None, headers: dict | None = None):
        super().__init__(status, message, headers)
        self.code = code or CODES.get(status, "error")


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_response(status: int, code: str, message: str, headers=None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=dict(headers or {}))


def install(app: FastAPI, retry_after_s: int) -> None:
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = getattr(exc, "code", None) or CODES.get(exc.status_code, "error")
        headers = dict(exc.headers or {})
        if exc.status_code == 503:
            headers.setdefault("Retry-After", str(retry_after_s))
        return error_response(exc.status_code, code, str(exc.detail), headers or None)

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # A query parameter of the wrong type is a malformed request (400); 422 is kept for images.
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("query", "path", "header"))
            parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
        return error_response(400, "bad_request", "; ".join(parts) or "invalid request")

    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return error_response(503, "queue_full", f"{exc}; retry after {retry_after_s} s",
                              {"Retry-After": str(retry_after_s)})

    async def disconnected(request: Request, exc: ClientDisconnect) -> JSONResponse:
        return error_response(400, "bad_request", "the client disconnected before sending the whole body")

    async def internal(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises the exception after this response, so uvicorn logs its traceback.
        return error_response(500, "internal_error", "internal server error (details are in the server log)")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(QueueFull, queue_full)
    app.add_exception_handler(ClientDisconnect, disconnected)
    app.add_exception_handler(Exception, internal)
