"""Running the app under uvicorn, with a graceful drain on SIGTERM / Ctrl-C.

On the first signal the server keeps its socket open but answers every new request
with 503, lets in-flight requests finish for up to `shutdown_timeout` seconds (then
aborts them), and exits. A second signal ends every in-flight request at once (streams
get an error event and `[DONE]`, not a cut mid-chunk) and exits without waiting.
"""

from __future__ import annotations

import threading
import time

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT = 10.0


class DeadlineH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on request headers: a connection that has
    not sent a whole request head within `header_timeout` seconds of connecting (or of
    starting a new request on a kept-alive connection) is closed, so half-sent headers
    cannot hold sockets open. (Bodies have their deadline in the app: `app.Guard`.)"""

    header_timeout = DEFAULT_HEADER_TIMEOUT

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._header_timer = None
        self._waiting_cycle = None
        super().connection_made(transport)
        self._arm()

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._header_timer is None:
            self._waiting_cycle = self.cycle
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        if self._idle():
            self._arm()
        super().data_received(data)
        if self.cycle is not self._waiting_cycle:  # a request head arrived
            self._disarm()

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.cycle is self._waiting_cycle and self._idle():
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose exit waits for the app's in-flight requests to drain."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.app_state = config.app.state.draftwise

    def handle_exit(self, sig, frame) -> None:
        if self.app_state.draining:  # second signal: end every request with an error event, exit now
            self.app_state.engine.abort_all("the server was stopped (a second shutdown signal)")
            self.should_exit = True
            self.force_exit = True  # uvicorn: do not wait for open connections
            return
        self.app_state.begin_drain()

    async def on_tick(self, counter: int) -> bool:
        if self.app_state.drained():
            self.should_exit = True
        return await super().on_tick(counter)

    @property
    def port(self) -> int:
        """The port actually bound (useful with port=0)."""
        return self.servers[0].sockets[0].getsockname()[1]


def make_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                header_timeout: float = DEFAULT_HEADER_TIMEOUT) -> DrainingServer:
    protocol = type("DeadlineH11", (DeadlineH11,), {"header_timeout": header_timeout})
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            access_log=log_level == "debug", lifespan="on", http=protocol)
    return DrainingServer(config)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
          header_timeout: float = DEFAULT_HEADER_TIMEOUT) -> None:
    """Serve until SIGTERM / SIGINT, then drain and return."""
    make_server(app, host, port, log_level, header_timeout).run()


class ServerThread:
    """The server in a background thread (tests, notebooks): `with ServerThread(app) as s: s.url`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 header_timeout: float = DEFAULT_HEADER_TIMEOUT) -> None:
        self.server = make_server(app, host, port, log_level, header_timeout)
        self.thread = threading.Thread(target=self.server.run, name="draftwise-server", daemon=True)
        self.host = host

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.server.port}"

    def drain(self) -> None:
        """What SIGTERM does: stop accepting, let in-flight requests finish, exit."""
        self.server.handle_exit(15, None)

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
