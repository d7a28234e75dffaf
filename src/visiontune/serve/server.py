"""`visiontune serve`: uvicorn running the app, with a graceful shutdown.

On SIGTERM (or Ctrl-C) the server stops accepting connections, /readyz turns 503, the requests in flight
finish (for up to `graceful_timeout_s`), and the process exits 0. With several workers, uvicorn's
supervisor forwards the signal to each worker process, and each does the same.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from visiontune.config import API_KEY_ENV, ServeConfig, from_dict, override, to_dict
from visiontune.errors import ConfigError

log = logging.getLogger("visiontune.serve")
WORKER_ENV = "VISIONTUNE_SERVE_WORKER"  # how worker processes learn what to serve (they are spawned fresh)


def serve(model: str | Path, *, config: ServeConfig | None = None, **overrides) -> None:
    """Serve a run directory, an ensemble, a .onnx or a TorchScript file over HTTP until SIGTERM or Ctrl-C: the JSON
    API under /v1, the web page at /, the OpenAPI docs at /docs. Settings are ServeConfig's (host=, port=,
    workers=, api_key=, backend=, queue_size=, ...); the API key defaults to $VISIONTUNE_API_KEY."""
    cfg = override(config or ServeConfig(), **overrides)
    if cfg.api_key is None and os.environ.get(API_KEY_ENV):
        cfg = override(cfg, api_key=os.environ[API_KEY_ENV])
    run(model, cfg)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _uvicorn_config(app, cfg: ServeConfig, **extra):
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_config=None, log_level=cfg.log_level,
                            access_log=False,  # AccessLog logs every request, with its latency
                            lifespan="on", timeout_graceful_shutdown=cfg.graceful_timeout_s, server_header=False,
                            http=HeaderTimeoutHTTP, **extra)
    config.header_timeout_s = cfg.header_timeout_s  # read by HeaderTimeoutHTTP (travels to worker processes too)
    config.linger_s = cfg.body_timeout_s
    return config


# Most bytes of a refused body read and thrown away after the answer, before the connection is cut anyway.
_LINGER_BYTES = 256 << 20


class _LingeringTransport:
    """The connection's transport as uvicorn's request cycle sees it: its close() lingers (see HeaderTimeoutHTTP)."""

    def __init__(self, transport, protocol: "HeaderTimeoutHTTP"):
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name):
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol.close_lingering()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()


class HeaderTimeoutHTTP(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol (httptools, the fast parser it picks by itself), closing a connection whose
    request headers have not all arrived `header_timeout_s` after its first byte (or after it opened): uvicorn
    itself waits for headers forever, so a thousand clients trickling header bytes (slowloris) would hold a
    thousand connections.

    And closing a connection whose request body is still arriving (a 413) as a lingering close: the answer is
    sent, the sending side shut, and the rest of the body read and dropped (up to `linger_s` and _LINGER_BYTES)
    before the socket closes. Closed at once, the kernel answers the unread bytes with a reset, and a client that
    sends its whole body before reading (Python's http.client and `requests`) got "connection reset" or "broken
    pipe" instead of the 413's JSON.
    """

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.header_timeout_s = getattr(config, "header_timeout_s", ServeConfig.header_timeout_s)
        self.linger_s = getattr(config, "linger_s", ServeConfig.body_timeout_s)
        self.header_timer = None
        self.lingering = False
        self.linger_left = _LINGER_BYTES

    def close_lingering(self) -> None:
        transport = self.transport._transport
        body_unread = self.cycle is not None and self.cycle.more_body and not self.cycle.disconnected
        if self.lingering or not body_unread or transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        self.lingering = True
        self._disarm()
        transport.resume_reading()  # uvicorn pauses reading while a body waits for the app
        transport.write_eof()  # after the answer already written: the client reads it, then our end
        self.loop.call_later(self.linger_s, transport.close)

    def _awaiting_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self.header_timer is None:
            self.header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_too_slow(self) -> None:
        self.header_timer = None
        if self._awaiting_headers() and not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.transport = _LingeringTransport(transport, self)
        self._arm()

    def eof_received(self):
        if self.lingering:  # the client sent the rest of its body, and has read our answer or will
            self.transport._transport.close()
        return None

    def data_received(self, data: bytes) -> None:
        if self.lingering:  # the rest of a refused body: dropped unparsed
            self.linger_left -= len(data)
            if self.linger_left < 0:
                self.transport._transport.close()
            return
        if self._awaiting_headers():
            self._arm()  # a request starts on a kept-alive connection: its headers are timed too
        super().data_received(data)
        if not self._awaiting_headers():
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._awaiting_headers() and self.header_timer is not None:
            self._disarm()  # idle between requests: uvicorn's keep-alive timeout takes over

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def run(model: str | Path, cfg: ServeConfig) -> None:
    """Load `model` and serve it until SIGTERM or Ctrl-C."""
    from visiontune.serve.model import load_model

    setup_logging(cfg.log_level)
    # Loaded here even with several workers: a bad model is then one clear error, not N crashed workers.
    clf = load_model(model, cfg)
    log.info("serving %s (%s, %d classes)%s", model, clf.engine_name, len(clf.labels),
             "; API key required" if cfg.api_key else "")
    if cfg.workers > 1:
        from uvicorn.supervisors import Multiprocess

        del clf
        os.environ[WORKER_ENV] = json.dumps({"model": str(model), "config": to_dict(cfg)})
        config = _uvicorn_config(f"{__name__}:worker_app", cfg, factory=True, workers=cfg.workers)
        Multiprocess(config, sockets=[_bind(config)]).run()
        return
    from visiontune.serve.app import create_app

    app = create_app(clf, cfg)
    server = _Server(_uvicorn_config(app, cfg), app)
    # uvicorn re-raises the signal it stopped on once it has shut down; after a graceful SIGTERM that
    # would kill the process with status 143, so SIGTERM is a no-op by then and the exit status is 0.
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot start (its log says why, e.g. address in use)
        raise ConfigError(f"could not serve on {cfg.host}:{cfg.port} (see the log above)") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise ConfigError(f"could not serve on {cfg.host}:{cfg.port} (see the log above)")


def _bind(config):
    try:
        return config.bind_socket()
    except SystemExit:
        raise ConfigError(f"could not serve on {config.host}:{config.port} (see the log above)") from None


class _Server(uvicorn.Server):
    """Turns /readyz to 503 the moment a stop signal arrives, before the connections drain."""

    def __init__(self, config, app):
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig, frame):
        self._app.state.serving["ready"] = False
        super().handle_exit(sig, frame)


def worker_app():
    """The app factory each worker process calls (uvicorn `factory=True`)."""
    from visiontune.serve.app import create_app
    from visiontune.serve.model import load_model

    spec = json.loads(os.environ[WORKER_ENV])
    cfg = from_dict(ServeConfig, spec["config"], "serve")
    setup_logging(cfg.log_level)
    return create_app(load_model(spec["model"], cfg), cfg)
