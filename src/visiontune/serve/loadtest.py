"""Load and bad input for a running server, standard library only: `bench/serve_benchmark.py` and the
tests both use it, so the benchmark's numbers and the tests' checks come from the same client.

Traffic goes only to the host and port given (a loopback server in the benchmark and the tests), and
every loop is bounded in count and time.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict
    seconds: float

    def json(self):
        return json.loads(self.body)

    @property
    def error_code(self) -> str | None:
        try:
            return self.json()["error"]["code"]
        except (ValueError, KeyError, TypeError):
            return None


def multipart(files: list[tuple[str, bytes, str]], field_name: str = "file") -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data form with one `field_name` part per (name, data, type)."""
    boundary = "visiontune-" + format(time.perf_counter_ns(), "x")
    parts = []
    for name, data, kind in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{name}"\r\n'
                     f"Content-Type: {kind}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def request(host: str, port: int, method: str, path: str, body: bytes = b"", headers: dict | None = None,
            timeout: float = 30.0, connection: http.client.HTTPConnection | None = None) -> Reply:
    """One request (on `connection` when given, kept alive; else on a new one, closed after)."""
    conn = connection or http.client.HTTPConnection(host, port, timeout=timeout)
    start = time.perf_counter()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return Reply(response.status, data, dict(response.getheaders()), time.perf_counter() - start)
    finally:
        if connection is None:
            conn.close()


# --------------------------------------------------------------------------------------------- load


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the two nearest ranks (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass
class LoadResult:
    clients: int
    requests: int  # per client
    seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # requests that got no HTTP answer at all
    latencies_ms: list[float] = field(default_factory=list)  # of the 200 answers

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + len(self.failures)

    @property
    def errors(self) -> int:
        return self.total - self.statuses.get(200, 0)

    @property
    def throughput(self) -> float:
        return self.statuses.get(200, 0) / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict:
        ms = self.latencies_ms
        return {"clients": self.clients, "requests_per_client": self.requests, "total": self.total,
                "errors": self.errors, "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "failures": self.failures[:10], "seconds": round(self.seconds, 3),
                "requests_per_s": round(self.throughput, 1),
                "latency_ms": {"p50": round(percentile(ms, 50), 1), "p95": round(percentile(ms, 95), 1),
                               "p99": round(percentile(ms, 99), 1), "max": round(max(ms), 1) if ms else None}}


def run_load(host: str, port: int, bodies: list[bytes], *, clients: int, requests: int,
             path: str = "/v1/predict", content_type: str = "image/jpeg", headers: dict | None = None,
             timeout: float = 30.0) -> LoadResult:
    """`clients` threads, each with one kept-alive connection, sending `requests` raw-body requests one
    after another; bodies are taken in turn. All clients start together."""
    result = LoadResult(clients, requests)
    lock = threading.Lock()
    start_line = threading.Barrier(clients + 1)
    sent_headers = {"Content-Type": content_type, **(headers or {})}

    def client(index: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        start_line.wait()
        for i in range(requests):
            body = bodies[(index * requests + i) % len(bodies)]
            try:
                reply = request(host, port, "POST", path, body, sent_headers, connection=conn)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()  # reconnects on the next request
                with lock:
                    result.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                result.statuses[reply.status] += 1
                if reply.status == 200:
                    result.latencies_ms.append(reply.seconds * 1000)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start_line.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - began
    return result


# --------------------------------------------------------------------------------------------- bad input


def _png(width: int, height: int, colour_type: int, idat: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bomb_png(side: int = 100_000) -> bytes:
    """A small, valid-looking PNG whose header claims side x side RGB pixels (3e10 bytes decoded)."""
    return _png(side, side, 2, zlib.compress(b"\0" * 1_000_000, 9))  # the start of an all-black image


def thin_png(width: int = 300_000, height: int = 32) -> bytes:
    """A whole, valid greyscale PNG of a few KB (all-zero rows) of extreme aspect ratio: scaled so its short side
    fits a model, it would be millions of pixels long."""
    return _png(width, height, 0, zlib.compress(b"\0" * ((width + 1) * height), 9))


def icon_bomb(side: int = 20_000) -> bytes:
    """An .ico whose directory says 256 x 256 and whose PNG inside says side x side (Pillow decodes it inside
    Image.open: 1.6 GB for 20000 x 20000)."""
    png = _png(side, side, 0, zlib.compress(b"\0" * 100_000, 9))
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png


def many_scan_jpeg(jpeg: bytes, scans: int = 5_000) -> bytes:
    """`jpeg` (a baseline photo: one scan) with a scan repeated to `scans` scans, each one a pass over the whole
    image; the repeat is the scan's header alone with no data, so the file stays small."""
    start = jpeg.index(b"\xff\xda")
    header = jpeg[start:start + 2 + struct.unpack_from(">H", jpeg, start + 2)[0]]
    return jpeg[:-2] + header * scans + jpeg[-2:]


def hold_slow_clients(host: str, port: int, count: int, jpeg: bytes, *, headers: dict | None = None,
                      body_bytes: int = 100) -> list[socket.socket]:
    """`count` connections that send their headers and `body_bytes` of the body, then nothing (close them)."""
    head = _head("/v1/predict", host, {**(headers or {}), "Content-Type": "image/jpeg", "Content-Length": len(jpeg)})
    held = []
    for _ in range(count):
        sock = socket.create_connection((host, port), timeout=30)
        sock.sendall(head + jpeg[:body_bytes])
        held.append(sock)
    return held


def raw_exchange(host: str, port: int, head: bytes, send_body=None, timeout: float = 30.0) -> Reply:
    """Send request headers, then let `send_body(sock)` run on its own thread (it may stall or be cut off),
    and read the response meanwhile, as a client does that does not wait for its upload to finish."""
    start = time.perf_counter()
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.sendall(head)
        sender = None
        if send_body is not None:
            def guarded():
                try:
                    send_body(sock)
                except OSError:  # the server answered and closed: the rest is not wanted
                    pass
            sender = threading.Thread(target=guarded, daemon=True)
            sender.start()
        response = http.client.HTTPResponse(sock)
        response.begin()
        data = response.read()
        reply = Reply(response.status, data, dict(response.getheaders()), time.perf_counter() - start)
        return reply
    finally:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


def _head(path: str, host: str, headers: dict) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _zeros(total: int, chunked: bool, chunk: int = 1 << 16):
    def send(sock):
        block = b"\0" * chunk
        left = total
        while left > 0:
            piece = block[:min(chunk, left)]
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            left -= len(piece)
        if chunked:
            sock.sendall(b"0\r\n\r\n")
    return send


@dataclass
class Probe:
    name: str
    expected: int
    status: int | None = None
    code: str | None = None
    detail: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == self.expected

    def to_dict(self) -> dict:
        return {"input": self.name, "expected": self.expected, "status": self.status, "code": self.code,
                "seconds": round(self.seconds, 3), "detail": self.detail[:200]}


def bad_inputs(host: str, port: int, jpeg: bytes, *, headers: dict | None = None, big_mb: int = 50,
               slow_timeout: float = 60.0, api_key_required: bool = False) -> list[Probe]:
    """Each bad request once, with the status a correct server gives it. `headers` (the API key, when the
    server has one) go on every request but the ones that test the key. `slow_timeout`: how long the slow
    client waits for the server's 408 (more than the server's body timeout)."""
    auth = dict(headers or {})
    big = big_mb * 1024 * 1024
    text = b"This is a text file, not a photo.\n" * 20
    long_name, long_type = multipart([("x" * 10_000 + ".jpg", jpeg, "image/jpeg")])
    probes: list[tuple[str, int, object]] = [
        ("truncated JPEG", 422, lambda: request(host, port, "POST", "/v1/predict", jpeg[: len(jpeg) // 2],
                                                {**auth, "Content-Type": "image/jpeg"})),
        (f"{big_mb} MB body (Content-Length)", 413, lambda: raw_exchange(host, port, _head(
            "/v1/predict", host, {**auth, "Content-Type": "image/jpeg", "Content-Length": big}), _zeros(big, False))),
        (f"{big_mb} MB body (chunked, no length)", 413, lambda: raw_exchange(host, port, _head(
            "/v1/predict", host, {**auth, "Content-Type": "image/jpeg", "Transfer-Encoding": "chunked"}),
            _zeros(big, True))),
        ("zip-bomb PNG header (100000 x 100000)", 422, lambda: request(
            host, port, "POST", "/v1/predict", bomb_png(), {**auth, "Content-Type": "image/png"})),
        ("ICO holding a 20000 x 20000 PNG", 422, lambda: request(
            host, port, "POST", "/v1/predict", icon_bomb(), {**auth, "Content-Type": "image/x-icon"})),
        ("JPEG with 5000 scans", 422, lambda: request(
            host, port, "POST", "/v1/predict", many_scan_jpeg(jpeg), {**auth, "Content-Type": "image/jpeg"})),
        ("thin PNG (300000 x 32, 9 KB)", 422, lambda: request(
            host, port, "POST", "/v1/predict", thin_png(), {**auth, "Content-Type": "image/png"})),
        ("empty body", 400, lambda: request(host, port, "POST", "/v1/predict", b"",
                                            {**auth, "Content-Type": "image/jpeg"})),
        ("wrong content type (JPEG sent as application/json)", 415, lambda: request(
            host, port, "POST", "/v1/predict", jpeg, {**auth, "Content-Type": "application/json"})),
        ("text file sent as image/jpeg", 415, lambda: request(
            host, port, "POST", "/v1/predict", text, {**auth, "Content-Type": "image/jpeg"})),
        ("malformed multipart", 400, lambda: request(
            host, port, "POST", "/v1/predict", b"--nope\r\ngarbage",
            {**auth, "Content-Type": "multipart/form-data; boundary=other"})),
        # python-multipart refuses a part header line over 4 KiB: a malformed request, not a crash
        ("10k-character filename", 400, lambda: request(
            host, port, "POST", "/v1/predict", long_name, {**auth, "Content-Type": long_type})),
        ("slow client (headers, then 10 bytes, then nothing)", 408, lambda: raw_exchange(
            host, port, _head("/v1/predict", host, {**auth, "Content-Type": "image/jpeg", "Content-Length": len(jpeg)})
            + jpeg[:10], None, timeout=slow_timeout)),
    ]
    if api_key_required:
        probes += [
            ("missing API key", 401, lambda: request(host, port, "POST", "/v1/predict", jpeg, {"Content-Type": "image/jpeg"})),
            ("wrong API key", 401, lambda: request(host, port, "POST", "/v1/predict", jpeg,
                                                   {"Content-Type": "image/jpeg", "X-API-Key": "wrong"})),
        ]
    results = []
    for name, expected, send in probes:
        probe = Probe(name, expected)
        start = time.perf_counter()
        try:
            reply = send()
            probe.status, probe.code = reply.status, reply.error_code
            probe.detail = reply.body.decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:
            probe.detail = f"no answer: {type(exc).__name__}: {exc}"
        probe.seconds = time.perf_counter() - start
        results.append(probe)
    return results


def parallel_probes(host: str, port: int, jpeg: bytes, **kwargs) -> tuple[threading.Thread, list[Probe]]:
    """`bad_inputs` on a thread (started), to run while a load runs; join the thread, then read the list."""
    out: list[Probe] = []
    thread = threading.Thread(target=lambda: out.extend(bad_inputs(host, port, jpeg, **kwargs)), daemon=True)
    thread.start()
    return thread, out
