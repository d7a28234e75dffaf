"""Getting images out of requests without trusting them: size and time limits enforced while the body is
read (never buffered first), content types checked before reading, decoding off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from visiontune.data.decode import decode_cost
from visiontune.data.loader import load_for_model
from visiontune.data.transforms import Preprocess
from visiontune.errors import ImageDecodeError
from visiontune.serve.errors import ApiError

# After refusing a body it has not read, the server cannot reuse the connection: the rest of the body
# would be read as the next request.
CLOSE = {"Connection": "close"}
NAME_LIMIT = 255  # characters of a file name echoed back
HOW = ("send an image as multipart/form-data (field `file`) or as the raw body with an image/* "
       "Content-Type")


class BodyBudget:
    """Bytes of request bodies held at once, over all requests. A body that would take the total past `limit`
    is refused (503) as it arrives, so memory stays bounded however many clients upload, while a slow client
    holds only the few bytes it has sent (it holds no place in the model's queue)."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0

    def account(self) -> "BodyAccount":
        return BodyAccount(self)


class BodyAccount:
    """One request's share of the budget, given back when the request ends (`with budget.account() as a:`)."""

    def __init__(self, budget: BodyBudget):
        self.budget, self.bytes = budget, 0

    def charge(self, n: int) -> None:
        if self.budget.held + n > self.budget.limit:
            raise ApiError(503, "the server is receiving as much as it holds at once; retry shortly", code="busy",
                           headers=CLOSE)
        self.budget.held += n
        self.bytes += n

    def __enter__(self) -> "BodyAccount":
        return self

    def __exit__(self, *exc) -> None:
        self.budget.held -= self.bytes
        self.bytes = 0


@dataclass
class Upload:
    name: str
    data: bytes
    media_type: str = ""


def media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def is_multipart(request: Request) -> bool:
    return media_type(request.headers.get("content-type")) == "multipart/form-data"


def _image_type(value: str) -> bool:
    # application/octet-stream: clients that do not know what they send; the bytes decide.
    return value.startswith("image/") or value == "application/octet-stream"


def check_headers(request: Request, max_bytes: int, multipart_only: bool = False) -> None:
    """What can be refused from the headers alone, before a place in the queue is taken."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            size = int(length)
        except ValueError:
            raise ApiError(400, f"Content-Length {length[:40]!r} is not a number", headers=CLOSE) from None
        if size > max_bytes:
            raise ApiError(413, f"the body is {size:,} bytes; the limit is {max_bytes:,}", headers=CLOSE)
    kind = media_type(request.headers.get("content-type"))
    if kind == "multipart/form-data":
        return
    if multipart_only:
        raise ApiError(415, f"Content-Type {kind or '(none)'}: send the images as multipart/form-data, "
                            f"one `file` field each", headers=CLOSE)
    if not _image_type(kind):
        raise ApiError(415, f"Content-Type {kind or '(none)'} is not an image type; {HOW}", headers=CLOSE)


def limit_body(request: Request, max_bytes: int, timeout_s: float, account: BodyAccount) -> Request:
    """The same request, whose body reads fail with 413 past `max_bytes`, with 408 when the whole body has not
    arrived `timeout_s` after reading began, and with 503 when the server's body budget is spent."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    received = 0
    finished = False
    receive = request.receive

    async def limited():
        nonlocal received, finished
        if finished:  # after the body, only a disconnect can come: no limit applies
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            raise ApiError(408, f"the body did not arrive within {timeout_s:g} s", headers=CLOSE) from None
        if message["type"] == "http.request":
            chunk = len(message.get("body", b""))
            received += chunk
            if received > max_bytes:
                raise ApiError(413, f"the body is over the limit of {max_bytes:,} bytes", headers=CLOSE)
            account.charge(chunk)
            finished = not message.get("more_body", False)
        return message

    return Request(request.scope, limited)


async def _part(value, field: str) -> Upload:
    if not isinstance(value, UploadFile):
        raise ApiError(400, f"field `{field}` is text; it must be a file")
    return Upload((value.filename or field)[:NAME_LIMIT], await value.read(), media_type(value.content_type))


async def read_images(request: Request, max_bytes: int, timeout_s: float, max_files: int,
                      account: BodyAccount) -> list[Upload]:
    """The image(s) of a request: the raw body, or the `file` (or `files`) fields of a multipart form."""
    limited = limit_body(request, max_bytes, timeout_s, account)
    if not is_multipart(request):
        data = await limited.body()
        if not data:
            raise ApiError(400, f"empty body; {HOW}")
        return [Upload("body", data, media_type(request.headers.get("content-type")))]
    try:
        # Starlette spools file parts over 1 MiB to disk, so a large upload is not held twice in memory.
        form = await limited.form(max_files=max_files, max_fields=max_files)
    except HTTPException as exc:
        if isinstance(exc, ApiError):
            raise
        # python-multipart refuses part header lines over 4 KiB (a very long file name among them)
        raise ApiError(400, f"malformed multipart/form-data body ({str(exc.detail).rstrip('.')}; part headers, "
                            f"file names included, are limited to 4 KiB)") from None
    try:
        fields = [(k, v) for k, v in form.multi_items() if k in ("file", "files")]
        if not fields:
            raise ApiError(400, "multipart body without a `file` field; " + HOW)
        return [await _part(value, key) for key, value in fields]
    finally:
        await form.close()


def decode_crop(data: bytes, spec: Preprocess, max_pixels: int) -> np.ndarray:
    """The crop the model sees: the same decode, resize and centre crop as training and `predict`."""
    return load_for_model(data, spec, max_pixels)


def decode_error(name: str, exc: ImageDecodeError) -> ApiError:
    if exc.reason.startswith("not an image"):
        return ApiError(415, f"{name}: {exc.reason}")
    if exc.reason == "zero-byte file":
        return ApiError(400, f"{name}: empty file")
    return ApiError(422, f"{name}: {exc.reason}")


class PixelBudget:
    """Pixels being decoded at once, over all requests and every image of a batch. A decode charges what its header
    says it will hold (a JPEG at its draft scale) and waits its turn while the total would pass `limit`: a few
    16-bit PNGs or WebP canvases just under --max-pixels took 1.2-1.7 GB each, and a handful at once exhausted
    the machine. One image larger than the whole budget decodes alone."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self._changed = asyncio.Condition()

    @asynccontextmanager
    async def hold(self, pixels: int):
        pixels = min(pixels, self.limit)
        async with self._changed:
            await self._changed.wait_for(lambda: self.held + pixels <= self.limit)
            self.held += pixels
        try:
            yield
        finally:
            async with self._changed:
                self.held -= pixels
                self._changed.notify_all()


# After a decode this large, the freed memory is handed back to the system: glibc keeps it otherwise, and a
# server that decoded a few 80 MP images held 500-800 MB it no longer used.
_TRIM_AFTER_PIXELS = 16_000_000


def _return_freed_memory() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


async def decode(upload: Upload, spec: Preprocess, max_pixels: int, pool: Executor,
                 budget: PixelBudget | None = None) -> np.ndarray:
    if upload.media_type and not _image_type(upload.media_type):  # a form part's declared type
        raise ApiError(415, f"{upload.name}: not an image (sent as {upload.media_type})")
    loop = asyncio.get_running_loop()
    try:
        if budget is None:
            return await loop.run_in_executor(pool, decode_crop, upload.data, spec, max_pixels)
        cost = await loop.run_in_executor(pool, partial(decode_cost, upload.data, draft=spec.resize_size,
                                                        max_pixels=max_pixels, where=upload.name))
        async with budget.hold(cost):
            crop = await loop.run_in_executor(pool, decode_crop, upload.data, spec, max_pixels)
        if cost >= _TRIM_AFTER_PIXELS:
            with contextlib.suppress(RuntimeError):  # the pool shut down: the server is stopping
                loop.run_in_executor(pool, _return_freed_memory)
        return crop
    except ImageDecodeError as exc:
        raise decode_error(upload.name, exc) from None
