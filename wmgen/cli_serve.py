"""The `wmgen serve` command: its options (generate's model, sampling and memory
options, and the server's own), and the run: load the model once, start the
engine (`wmgen.engine`) and the HTTP routes (`wmgen.server`) under uvicorn, and
stop cleanly on Ctrl-C or SIGTERM. No torch at import; `wmgen.cli` registers it."""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from wmgen import options

if TYPE_CHECKING:
    from wmgen.engine import Engine
from wmgen.errors import UsageError

SERVE_EXTRA = "wmgen serve needs the server's packages: pip install 'wmgen[serve]' (uvicorn, starlette, sse-starlette, prometheus-client)"


def serve(
    host: Annotated[str, typer.Option("--host", help="The address to listen on; beyond loopback, give --api-key.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="The port to listen on (0: any free one, printed).", min=0, max=65535)] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="Require 'Authorization: Bearer KEY' (also WMGEN_API_KEY).", envvar="WMGEN_API_KEY", show_default=False)] = None,
    max_rows: Annotated[int, typer.Option("--max-rows", help="Rows (completions) decoded together at most; more wait in the queue.", min=1, max=256)] = 8,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Requests waiting for a row at most; beyond, 429 with Retry-After.", min=0)] = 64,
    max_body: Annotated[int, typer.Option("--max-body", help="The largest request body in bytes; beyond, 413.", min=1024)] = 4 << 20,
    max_tokens: options.MaxNewTokens = None,
    temperature: options.Temperature = None,
    top_k: options.TopK = None,
    top_p: options.TopP = None,
    repetition_penalty: options.RepetitionPenalty = None,
    seed: options.Seed = None,
    stop: options.Stop = None,
    ignore_eos: options.IgnoreEos = None,
    capacity: options.Capacity = None,
    keep: options.Keep = None,
    evict: options.Evict = None,
    policy: options.Policy = None,
    recent: options.Recent = None,
    model: options.Model = None,
    device: options.Device = None,
    dtype: options.Dtype = None,
    config: options.Config = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="No log line per request.")] = False,
) -> int:
    """Serve the model over HTTP, OpenAI's completions API and wmgen's memories.

    The model is loaded once; requests share it, their decode steps batched
    together. The options of generate are the defaults of every request. Ctrl-C or
    SIGTERM stops it: requests in flight end at their next token (reason
    "interrupted"), sessions are saved, and it exits 130 or 143.
    """
    from wmgen.cli import Interrupted, build_settings, notice, open_model, warn
    from wmgen.settings import state_dir

    try:
        import sse_starlette  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise UsageError(SERVE_EXTRA) from None
    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty; give a key, or leave it out")
    flags = dict(
        max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        seed=seed, stop=tuple(stop or ()), ignore_eos=ignore_eos, capacity=capacity, keep=keep, evict=evict, policy=policy,
        recent=recent, model=model, device=device, dtype=dtype,
    )
    if keep == "prompt":
        raise UsageError("--keep prompt: give a count; each request's prompt is its own (a request may send keep)")
    settings = build_settings(flags, config, quiet=False)
    listener = bind(host, port)
    if not loopback(host) and api_key is None:
        warn(f"warning: listening on {host} without --api-key: anyone who can reach this port can use the model")
    lm = open_model(settings)
    from wmgen.engine import Engine
    from wmgen.server import Server, log_line

    log = (lambda line: None) if quiet else log_line
    lm.shape()  # the settings' shape, checked against the model before serving
    engine = Engine(lm, state_dir(os.environ), rows=max_rows, queue=max_queue, log=log_line)
    app = Server(lm, engine, api_key=api_key, max_body=max_body, log=log).app()
    config_ = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=30)
    server = stopping_server(config_, engine)
    where = listener.getsockname()
    shown = f"[{where[0]}]" if ":" in where[0] else where[0]
    notice(f"serving {lm.name} at http://{shown}:{where[1]} ({max_rows} rows; Ctrl-C stops)")
    server.run(sockets=[listener])
    engine.shutdown()
    engine.join(60)
    if server.received is None:
        return 0
    stopped = f"; {server.in_flight} request(s) in flight were stopped at their next token" if server.in_flight else ""
    notice(f"stopped ({signal.Signals(server.received).name}){stopped}; sessions are saved")
    raise Interrupted(128 + server.received)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a one-line error (a port in use, an unknown host)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: {e.strerror}") from None
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror} (another server there? try --port)") from None
    sock.set_inheritable(True)
    return sock


def loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def stopping_server(config, engine: Engine):
    """uvicorn's server, whose first Ctrl-C or SIGTERM also tells the engine to
    stop its rows (so streaming requests end now, not when their text does), and
    which leaves the exit status to the command (130, 143) instead of re-raising
    the signal. A second signal exits at once."""
    import uvicorn

    class Stopping(uvicorn.Server):
        received: int | None = None
        in_flight = 0

        def handle_exit(self, sig, frame) -> None:
            if self.received is not None:
                os._exit(128 + sig)
            self.received = sig
            self.in_flight = engine.active_rows
            self.should_exit = True
            engine.shutdown()

        @contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    return Stopping(config)
