"""`wmgen serve`: the HTTP face of the engine (`wmgen.engine`), an ASGI app
(Starlette) that speaks OpenAI's completions API and wmgen's own memory routes.

Routes:

    GET  /health                     no key needed: for load balancers
    GET  /v1/models
    POST /v1/completions             OpenAI's, with wmgen's memory fields
    POST /v1/chat/completions        through a plain "User:"/"Bot:" transcript
    POST /v1/wmgen/generate          wmgen's events as JSON Lines (`generate --server`)
    DELETE /v1/wmgen/requests/ID     stop a running generate, as Ctrl-C would
    GET  /v1/memories                the sessions, as `wmgen sessions --json`
    GET|DELETE /v1/memories/NAME     `inspect-memory --json`; delete
    POST /v1/memories/NAME/EDIT      forget, pin, unpin, insert, fork, undo
    GET  /metrics                    Prometheus text format

Every error is OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`,
with status 400, 401, 404, 405, 413, 429 or 503; nothing a client sends gets a
traceback, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse as StarletteJSON
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from wmgen import session as sessions
from wmgen.engine import Ask, Busy, Engine, Job, Missing, check_prompt_fits, seeds_for
from wmgen.errors import SessionError, UsageError, WmgenError
from wmgen.events import Evicted, Finished, Started, Token

if TYPE_CHECKING:
    from wmgen.api import Model

MAX_BODY = 4 << 20  # bytes; a GPT-2 window is a few KB of text
MAX_LOGPROBS = 20
MAX_STOPS = 16
SAMPLING = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")
SHAPE = ("capacity", "keep", "evict", "policy", "recent")
# OpenAI fields wmgen does not do: refused unless they ask for what wmgen does anyway
NEUTRAL = {"best_of": (None, 1), "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
           "logit_bias": (None, {})}
COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "echo", "logprobs",
                     "stream", "stream_options", "user", "top_k", "repetition_penalty", "ignore_eos", "session", *SHAPE, *NEUTRAL}
CHAT_FIELDS = (COMPLETION_FIELDS - {"prompt", "echo", "logprobs", "suffix", "best_of", "session"}) | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs"}
GENERATE_FIELDS = {"prompt", "from_scratch", "options", "session", "continue", "save", "model"}


class Invalid(Exception):
    """A request the server refuses: the OpenAI-shaped error to answer with."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.code, self.kind, self.headers = status, param, code, kind, headers or {}


class JSONResponse(StarletteJSON):
    """JSON as wmgen writes it everywhere: strict, a number that is not finite as null."""

    def render(self, content) -> bytes:
        from wmgen.render import json_text

        return json_text(content).encode("utf-8")


def error_body(e: Invalid) -> dict:
    return {"error": {"message": str(e), "type": e.kind, "param": e.param, "code": e.code}}


def error_response(e: Invalid) -> JSONResponse:
    return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)


def as_invalid(e: BaseException) -> Invalid:
    """wmgen's errors, as the client is told them."""
    if isinstance(e, Invalid):
        return e
    if isinstance(e, Busy):
        status = 503 if "stopping" in str(e) else 429
        return Invalid(str(e), status=status, kind="server_busy" if status == 503 else "rate_limit_error",
                       code="unavailable" if status == 503 else "rate_limit_exceeded", headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, Missing):
        return Invalid(str(e), status=404, param="session", code="session_not_found", kind="not_found_error")
    if isinstance(e, UsageError):
        return Invalid(str(e), param=e.key)
    if isinstance(e, SessionError):
        return Invalid(str(e), param="session", code="session_unusable")
    if isinstance(e, WmgenError):
        return Invalid(str(e), status=400)
    return Invalid(f"internal error: {type(e).__name__}", status=500, kind="server_error")


class Server:
    """The routes, over one loaded model and its engine."""

    def __init__(self, lm: Model, engine: Engine, *, api_key: str | None = None, max_body: int = MAX_BODY,
                 log: Callable[[str], None] = lambda line: None):
        self.lm, self.engine, self.api_key, self.max_body, self.log = lm, engine, api_key, max_body, log
        self.requests: dict[tuple[str, int], int] = {}
        self.jobs: dict[str, Job] = {}  # generate requests by id, to stop them
        self.created = int(time.time())

    # --- the ASGI app -------------------------------------------------------------------

    def app(self) -> Callable:
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/wmgen/generate", self.generate, methods=["POST"]),
            Route("/v1/wmgen/requests/{id}", self.stop_request, methods=["DELETE"]),
            Route("/v1/memories", self.memories, methods=["GET"]),
            Route("/v1/memories/{name}", self.memory, methods=["GET", "DELETE"]),
            Route("/v1/memories/{name}/{edit}", self.edit, methods=["POST"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]
        inner = Starlette(routes=routes, exception_handlers={404: self._not_found, 405: self._not_allowed})
        return self._guarded(inner)

    def _guarded(self, inner: Callable) -> Callable:
        """Authentication, one log line per request, and no traceback ever."""

        async def app(scope, receive, send):
            if scope["type"] != "http":
                return await inner(scope, receive, send)
            started, status = time.perf_counter(), [0]

            async def sending(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            path = scope.get("path", "")
            try:
                if self.api_key is not None and path != "/health" and not self._authorized(scope):
                    await error_response(Invalid("a valid API key is needed: send 'Authorization: Bearer KEY'", status=401,
                                                 code="invalid_api_key"))(scope, receive, sending)
                else:
                    await inner(scope, receive, sending)
            except Exception as e:  # a bug: say so in one line, keep serving
                self.log(f"error: {scope.get('method')} {path}: {type(e).__name__}: {e}")
                if not status[0]:
                    await error_response(as_invalid(e))(scope, receive, sending)
            finally:
                self._count(path, status[0])
                client = scope.get("client") or ("-", 0)
                self.log(f'{client[0]} "{scope.get("method")} {path}" {status[0]} {time.perf_counter() - started:.3f} s')

        return app

    def _authorized(self, scope) -> bool:
        assert self.api_key is not None
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key.encode())

    def _count(self, path: str, status: int) -> None:
        route = path if path in ("/health", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/wmgen/generate",
                                 "/metrics", "/v1/memories") else ("/v1/memories/*" if path.startswith("/v1/memories/") else "other")
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1

    async def _not_found(self, request: Request, exc) -> Response:
        return error_response(Invalid(f"no route {request.url.path}; see GET /v1/models, POST /v1/completions", status=404,
                                      kind="not_found_error", code="not_found"))

    async def _not_allowed(self, request: Request, exc) -> Response:
        return error_response(Invalid(f"{request.method} is not allowed on {request.url.path}", status=405, code="method_not_allowed"))

    # --- reading a request ---------------------------------------------------------------

    async def body(self, request: Request, allowed: set[str]) -> dict:
        """The JSON object a request sends, at most `max_body` bytes, every field known."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise Invalid(f"the body has {length} bytes; this server takes at most {self.max_body}", status=413, code="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                raise Invalid(f"the body is over {self.max_body} bytes, the most this server takes", status=413, code="body_too_large")
            chunks.append(chunk)
        from wmgen import files

        try:
            value = files.parse_json(files.utf8(b"".join(chunks)))
        except files.FileProblem as e:
            raise Invalid(f"the body {e}", code="invalid_json") from None
        if not isinstance(value, dict):
            raise Invalid(f"the body must be a JSON object, not {_json_kind(value)}", code="invalid_json")
        for key in value:
            if key in NEUTRAL and key in allowed:
                if value[key] not in NEUTRAL[key]:
                    raise Invalid(f"'{key}' is not supported by wmgen (leave it out, or {NEUTRAL[key][-1]!r})", param=key, code="unsupported")
            elif key not in allowed:
                raise Invalid(f"unknown field '{key}'; see the README's server section for the fields wmgen takes", param=key,
                              code="unknown_field")
        return value

    def run_options(self, body: dict, *, max_key: str = "max_tokens") -> dict:
        """The sampling and run options a body gives, checked as the library checks them."""
        from wmgen.settings import argument

        options: dict[str, Any] = {}
        if body.get(max_key) is not None:
            options["max_new_tokens"] = body[max_key]
        for key in SAMPLING + ("ignore_eos",):
            if body.get(key) is not None:
                options[key] = body[key]
        if body.get("stop") is not None:
            stop = body["stop"]
            if isinstance(stop, list) and len(stop) > MAX_STOPS:
                raise Invalid(f"stop: at most {MAX_STOPS} stop texts", param="stop")
            options["stop"] = stop
        out = {}
        for key, value in options.items():
            param = max_key if key == "max_new_tokens" else key
            try:
                out[key] = argument(key, value)
            except UsageError as e:
                raise Invalid(str(e).replace(f"{key}:", f"{param}:", 1), param=param) from None
        return out

    def shape_of(self, body: dict) -> dict:
        from wmgen.settings import argument

        shape = {}
        for key in SHAPE:
            try:
                shape[key] = argument(key, body.get(key))
            except UsageError as e:
                raise Invalid(str(e), param=key) from None
        return shape

    def asks(self, prompts: list[list[int]], body: dict, options: dict, *, n: int = 1, alternatives: int = 0,
             score_prompt: bool = False) -> list[Ask]:
        """A row per prompt and sample, checked now (before any work): shape, settings, session."""
        shape = self.shape_of(body)
        session = body.get("session")
        if session is not None:
            try:
                sessions.check_name(session)
            except UsageError as e:
                raise Invalid(str(e), param="session") from None
            if len(prompts) * n != 1:
                raise Invalid("a session continues one memory: give one prompt and n 1", param="session")
        settings = self._settings(options)
        asks = []
        for ids in prompts:
            if session is None:
                try:
                    s = self.lm.shape(**shape, prompt_tokens=len(ids))
                except UsageError as e:
                    raise Invalid(str(e), param=e.key) from None
                if score_prompt:
                    try:
                        check_prompt_fits(ids, s.capacity)
                    except UsageError as e:
                        raise Invalid(str(e), param="echo") from None
            for seed in seeds_for(settings.sampling.seed, n):
                asks.append(Ask(ids, settings, seed, shape, memory="session" if session else "new", session=session,
                                save=session is not None, alternatives=alternatives, score_prompt=score_prompt))
        return asks

    def _settings(self, options: dict):
        s = self.lm.settings
        sampling = {k: v for k, v in options.items() if k in SAMPLING}
        run = {k: v for k, v in options.items() if k not in SAMPLING}
        return replace(s, sampling=replace(s.sampling, **sampling), run=replace(s.run, **run))

    def prompts(self, value, param: str = "prompt") -> list[list[int]]:
        """OpenAI's prompt: a string, a list of strings, a list of token ids, or a list
        of lists of them; an empty prompt starts from <|endoftext|>, as OpenAI's does."""
        from wmgen.settings import prompt_or_ids

        if value is None:
            value = ""
        if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
            items = value
        else:
            items = [value]
        if len(items) > self.engine.max_rows:
            raise Invalid(f"{param}: {len(items)} prompts; this server runs at most {self.engine.max_rows} at once", param=param)
        out = []
        for i, item in enumerate(items):
            where = param if len(items) == 1 else f"{param}[{i}]"
            try:
                p = prompt_or_ids(item, self.lm.info.vocab_size, where)
            except UsageError as e:
                raise Invalid(str(e), param=param) from None
            ids = self.lm.tokenizer.encode(p) if isinstance(p, str) else list(p)
            out.append(ids or [self.lm.tokenizer.eos_id])
        return out

    # --- running a job -------------------------------------------------------------------

    async def run_job(self, asks: list[Ask]) -> AsyncIterator[tuple[str, Any, Any]]:
        """Submit the rows as one job; its deliveries as they come. Leaving early (the
        client went away) takes the job out of the engine."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def deliver(kind, row, value):
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (kind, row, value))
            except RuntimeError:  # the event loop is gone: the server is stopping
                pass

        job = Job(asks, deliver)
        try:
            self.engine.submit(job)
        except WmgenError as e:
            raise as_invalid(e) from None
        self.jobs[job.id] = job
        done = False
        try:
            yield "job", None, job
            while True:
                kind, row, value = await queue.get()
                if kind == "error":
                    raise as_invalid(value)
                if kind == "done":
                    done = True
                    return
                yield kind, row, value
        finally:
            self.jobs.pop(job.id, None)
            if not done:
                self.engine.withdraw(job)

    async def gather(self, request: Request, asks: list[Ask], built: Choices) -> None:
        """A whole job into `built`, for an answer sent at the end; a client that
        goes away meanwhile takes its job out of the engine (as a stream's does)."""

        async def consume():
            async for kind, row, value in self.run_job(asks):
                built.take(kind, row, value)

        task = asyncio.ensure_future(consume())
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise Invalid("the client went away", status=499, code="client_closed")
        task.result()

    # --- routes ------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        e = self.engine
        return JSONResponse({"status": "stopping" if e.stopping else "ok", "model": self.lm.name, "rows": e.active_rows,
                             "max_rows": e.max_rows, "queued": e.queued})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.lm.name, "object": "model", "created": self.created, "owned_by": "wmgen",
             "n_positions": self.lm.n_positions}]})

    async def completions(self, request: Request) -> Response:
        try:
            body = await self.body(request, COMPLETION_FIELDS)
            options = self.run_options(body)
            n = self._count_field(body, "n", 1, 1, self.engine.max_rows)
            logprobs = body.get("logprobs")
            if logprobs is not None:
                logprobs = self._count_field(body, "logprobs", 0, 0, MAX_LOGPROBS)
            echo = self._bool_field(body, "echo")
            stream = self._bool_field(body, "stream")
            prompts = self.prompts(body.get("prompt"))
            if len(prompts) * n > self.engine.max_rows:
                raise Invalid(f"{len(prompts)} prompts × n {n} is {len(prompts) * n} rows; this server runs at most "
                              f"{self.engine.max_rows} at once", param="n")
            if echo and logprobs is not None and body.get("session") is not None:
                raise Invalid("echo with logprobs scores a new memory's prompt; leave out session", param="echo")
            asks = self.asks(prompts, body, options, n=n, alternatives=logprobs or 0,
                             score_prompt=bool(echo and logprobs is not None))
            usage_chunk = self._include_usage(body) if stream else False
        except Invalid as e:
            return error_response(e)
        texts = [self.lm.decode(ids) if echo else "" for ids in prompts for _ in range(n)]
        about = {"id": f"cmpl-{_random_id()}", "object": "text_completion", "created": int(time.time()), "model": self.lm.name}
        built = Choices(self.lm, len(asks), texts, logprobs)
        if stream:
            return self._sse(self._completion_chunks(asks, about, built, usage_chunk))
        try:
            await self.gather(request, asks, built)
        except Invalid as e:
            return error_response(e)
        return JSONResponse(about | {"choices": [built.choice(k) for k in range(len(asks))], "usage": built.usage()}
                            | {"wmgen": built.extra(self.engine)})

    async def _completion_chunks(self, asks, about, built, usage_chunk) -> AsyncIterator[dict]:
        async for kind, row, value in self.run_job(asks):
            for piece in built.take(kind, row, value):
                yield about | {"choices": [piece]}
        if usage_chunk:
            yield about | {"choices": [], "usage": built.usage()}

    async def chat_completions(self, request: Request) -> Response:
        from wmgen.chat import TEMPLATES, Template

        template = Template(*TEMPLATES["chat"])
        try:
            body = await self.body(request, CHAT_FIELDS)
            options = self.run_options(body, max_key="max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens")
            options["stop"] = (*options.get("stop", self.lm.settings.run.stop), template.stop)
            n = self._count_field(body, "n", 1, 1, self.engine.max_rows)
            alternatives = 0
            if self._bool_field(body, "logprobs"):
                alternatives = self._count_field(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
            stream = self._bool_field(body, "stream")
            transcript = chat_transcript(body.get("messages"), template)
            prompts = [self.lm.tokenizer.encode(transcript)]
            asks = self.asks(prompts, body, options, n=n, alternatives=alternatives)
            usage_chunk = self._include_usage(body) if stream else False
        except Invalid as e:
            return error_response(e)
        about = {"id": f"chatcmpl-{_random_id()}", "object": "chat.completion", "created": int(time.time()), "model": self.lm.name}
        built = Choices(self.lm, len(asks), [""] * len(asks), alternatives if self._bool_field(body, "logprobs") else None, chat=True)
        if stream:
            return self._sse(self._chat_chunks(asks, about | {"object": "chat.completion.chunk"}, built, usage_chunk))
        try:
            await self.gather(request, asks, built)
        except Invalid as e:
            return error_response(e)
        return JSONResponse(about | {"choices": [built.message(k) for k in range(len(asks))], "usage": built.usage()})

    async def _chat_chunks(self, asks, about, built, usage_chunk) -> AsyncIterator[dict]:
        for k in range(len(asks)):
            yield about | {"choices": [{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]}
        async for kind, row, value in self.run_job(asks):
            for piece in built.take(kind, row, value):
                yield about | {"choices": [piece]}
        if usage_chunk:
            yield about | {"choices": [], "usage": built.usage()}

    def _sse(self, chunks: AsyncIterator[dict]) -> Response:
        """Server-sent events, `data: {json}` each, then `data: [DONE]`; an error
        after the stream began is sent as an error object, then the stream ends."""
        from sse_starlette.sse import EventSourceResponse

        from wmgen.render import json_text

        async def events():
            try:
                async for chunk in chunks:
                    yield {"data": json_text(chunk)}
            except Invalid as e:
                yield {"data": json_text(error_body(e))}
                return
            yield {"data": "[DONE]"}

        return EventSourceResponse(events(), ping=15, headers={"Cache-Control": "no-cache"})

    def _include_usage(self, body: dict) -> bool:
        so = body.get("stream_options")
        if so is None:
            return False
        if not isinstance(so, dict) or set(so) - {"include_usage"}:
            raise Invalid("stream_options: expected {\"include_usage\": true|false}", param="stream_options")
        return self._bool_field(so, "include_usage")

    @staticmethod
    def _count_field(body: dict, key: str, default: int, low: int, high: int) -> int:
        from wmgen.settings import whole

        value = body.get(key)
        if value is None:
            return default
        try:
            return whole(value, key, low=low, high=high)
        except UsageError as e:
            raise Invalid(str(e), param=key) from None

    @staticmethod
    def _bool_field(body: dict, key: str) -> bool:
        value = body.get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise Invalid(f"{key}: expected true or false, got {_json_kind(value)}", param=key)
        return value

    # --- wmgen's own: the command line as a client ---------------------------------------

    async def generate(self, request: Request) -> Response:
        """`wmgen generate --server`: the run's events as JSON Lines, the records
        `--format jsonl` writes (the start record carries the model and settings),
        so the client writes exactly what a local run writes."""
        from wmgen.settings import as_dict

        try:
            body = await self.body(request, GENERATE_FIELDS)
            options = body.get("options") or {}
            if not isinstance(options, dict):
                raise Invalid("options: expected an object", param="options")
            unknown = sorted(set(options) - set(SAMPLING + SHAPE + ("max_new_tokens", "stop", "ignore_eos")))
            if unknown:
                raise Invalid(f"options: unknown option '{unknown[0]}'", param="options")
            model = body.get("model")
            if model is not None and model != self.lm.name:
                raise Invalid(f"this server serves {self.lm.name}, not {model}", param="model", code="model_not_found")
            run = self.run_options(options | {"max_tokens": options.get("max_new_tokens")})
            continuing = self._bool_field(body, "continue")
            save = body.get("save", True)
            if not isinstance(save, bool):
                raise Invalid("save: expected true or false", param="save")
            name = body.get("session") or "last"
            try:
                sessions.check_name(name)
            except UsageError as e:
                raise Invalid(str(e), param="session") from None
            prompt = body.get("prompt", "")
            if not isinstance(prompt, str):
                raise Invalid("prompt: expected a string", param="prompt")
            from wmgen.settings import check_utf8

            try:
                check_utf8(prompt, "prompt")
            except UsageError as e:
                raise Invalid(str(e), param="prompt") from None
            prompt_ids = ([self.lm.tokenizer.eos_id] if self._bool_field(body, "from_scratch") else []) + self.lm.tokenizer.encode(prompt)
            if not prompt_ids and not continuing:
                raise Invalid("the prompt is empty after tokenizing; give some text, or --from-scratch", param="prompt")
            shape = self.shape_of(options)
            settings = self._settings(run)
            if not continuing:
                try:
                    fresh = self.lm.shape(**shape, prompt_tokens=len(prompt_ids))
                except UsageError as e:
                    raise Invalid(str(e), param=e.key) from None
                shape = fresh._asdict()
            seed = seeds_for(settings.sampling.seed, 1)[0]
            ask = Ask(prompt_ids, settings, seed, shape, memory="continue" if continuing else "new", session=name, save=save)
        except Invalid as e:
            return error_response(e)
        about: dict[str, Any] = {"model": self.lm.name, "settings": as_dict(settings)}
        jobs = self.run_job([ask])
        try:
            first = await jobs.__anext__()  # the job
            pending_first = await jobs.__anext__()  # a missing session is a status, not a stream
        except Invalid as e:
            return error_response(e)
        except StopAsyncIteration:
            return error_response(Invalid("the run ended before it began", status=500, kind="server_error"))

        async def lines() -> AsyncIterator[str]:
            from wmgen.render import JsonlWriter

            out = _Lines()
            writer = JsonlWriter(out, about=about)  # type: ignore[arg-type]  # a TextIO's write and flush
            job = first[2]
            yield json.dumps({"type": "request", "id": job.id}) + "\n"
            try:
                pending: list = [pending_first]
                while True:
                    for kind, _, value in pending:
                        if kind != "event":
                            continue
                        if isinstance(value, Started):
                            about["settings"]["memory"] = self._memory_shape(job, ask)
                            about["settings"]["sampling"]["seed"] = value.seed
                        if isinstance(value, Finished):
                            writer.write(value, **job.saved.get(0, {}))
                        else:
                            writer.write(value)
                        yield out.take()
                    pending = [await jobs.__anext__()]
            except StopAsyncIteration:
                return
            except Invalid as e:
                yield json.dumps({"type": "error", "status": e.status, "message": str(e)}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    def _memory_shape(self, job: Job, ask: Ask) -> dict:
        if job.rows:
            return job.rows[0].memory.shape._asdict()
        return ask.shape

    async def stop_request(self, request: Request) -> Response:
        job = self.jobs.get(request.path_params["id"])
        if job is None:
            return error_response(Invalid("no such request running", status=404, kind="not_found_error", code="not_found"))
        job.cancel()
        return JSONResponse({"stopped": job.id})

    # --- memories ------------------------------------------------------------------------

    async def memories(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": sessions.listing(self.engine.state)})

    def _name(self, request: Request) -> str:
        name = request.path_params["name"]
        try:
            return sessions.check_name(name)
        except UsageError as e:
            raise Invalid(str(e), param="name") from None

    async def memory(self, request: Request) -> Response:
        try:
            name = self._name(request)
            if request.method == "GET":
                return JSONResponse(await self._call(name, lambda: self._read(name)))

            def delete():
                path = sessions.delete(self.engine.state, name)
                self.engine.forget_held(name)
                return {"deleted": name, "path": str(path)}

            return JSONResponse(await self._call(name, delete))
        except Invalid as e:
            return error_response(e)

    def _read(self, name: str) -> dict:
        try:
            return sessions.read(self.engine.state, name) | {"name": name}
        except SessionError as e:
            if not sessions.path_of(self.engine.state, name).exists():
                raise Missing(f"no session '{name}' on this server") from None
            raise e

    async def _call(self, name: str, work: Callable[[], Any]) -> Any:
        try:
            return await asyncio.wrap_future(self.engine.call(name, work))
        except WmgenError as e:
            if isinstance(e, SessionError) and str(e).startswith("no session"):
                raise Invalid(str(e), status=404, param="name", code="session_not_found", kind="not_found_error") from None
            raise as_invalid(e) from None

    async def edit(self, request: Request) -> Response:
        """An edit of a live memory, as `wmgen memory EDIT` makes it of a file: the
        memory changes in place (only what follows the first changed slot is
        recomputed, by its next run) and is saved, undoably."""
        from wmgen.spans import parse_span, show_span

        edit = request.path_params["edit"]
        fields = {"forget": {"span", "text", "pinned"}, "pin": {"span", "text"}, "unpin": {"span", "text"},
                  "insert": {"at", "text"}, "fork": {"to"}, "undo": set()}
        try:
            name = self._name(request)
            if edit not in fields:
                raise Invalid(f"no edit '{edit}'; one of {', '.join(fields)}", status=404, kind="not_found_error", code="not_found")
            body = await self.body(request, fields[edit])
            state = self.engine.state

            def spans(memory) -> list[tuple[int, int]]:
                span, text = body.get("span"), body.get("text")
                if (span is None) == (text is None):
                    raise UsageError("give a span (\"I-J\", inclusive, or \"I\") or a text (not both)", key="span")
                if span is not None:
                    if not isinstance(span, str):
                        raise UsageError("span: expected a string such as \"3-7\"", key="span")
                    return [parse_span(span, memory.fill)]
                if not isinstance(text, str):
                    raise UsageError("text: expected a string", key="text")
                found = memory.find(text)
                if not found:
                    raise UsageError(f"{text!r} is not in the memory; nothing was changed", key="text")
                return found

            def work():
                if edit == "undo":
                    sessions.undo(state, name)
                    self.engine.forget_held(name)
                    return {"session": name, "message": f"session '{name}' is back to the version before its last edit"}
                if edit == "fork":
                    to = body.get("to")
                    if not isinstance(to, str):
                        raise UsageError("to: the name of the copy", key="to")
                    path = sessions.fork(state, name, sessions.check_name(to))
                    return {"session": to, "message": f"forked session '{name}' as '{to}' ({path})"}
                memory = self.engine.memory_of(name)
                checkpoint = memory.checkpoint()
                try:
                    if edit == "insert":
                        at, text = body.get("at"), body.get("text")
                        from wmgen.settings import whole

                        at = whole(at, "at", low=0, high=memory.fill, key="at")
                        if not isinstance(text, str) or not text:
                            raise UsageError("text: the text to insert", key="text")
                        dropped = memory.insert(at, self.lm.tokenizer.encode(text))
                        said = f"inserted before slot {at}" + (f"; evicted {dropped} to make room" if dropped else "")
                    else:
                        found = spans(memory)
                        if edit == "forget":
                            pinned = body.get("pinned", False)
                            if not isinstance(pinned, bool):
                                raise UsageError("pinned: expected true or false", key="pinned")
                            for start, stop in reversed(found):
                                memory.forget(start, stop, pinned=pinned)
                            said = f"forgot {sum(b - a for a, b in found)} slot(s) ({', '.join(show_span(*s) for s in found)})"
                        else:
                            changed = sum((memory.pin if edit == "pin" else memory.unpin)(a, b) for a, b in found)
                            said = f"{edit}ned {changed} slot(s) ({', '.join(show_span(*s) for s in found)})"
                    snapshot = memory.snapshot()
                    expected = memory.loaded_from[1] if memory.loaded_from else None
                    sessions.write(state, name, snapshot, undoable=True, expected=expected)
                except BaseException:
                    memory.rollback(checkpoint)
                    raise
                self.engine.forget_held(name)  # its file is the truth now; the next run recomputes from the edit
                self.engine.held[name] = memory
                sessions.remember(memory, state, name, sessions.fingerprint(sessions.read(state, name)))
                return {"session": name, "message": said, "fill": memory.fill, "pending": memory.pending}

            return JSONResponse(await self._call(name, work))
        except Invalid as e:
            return error_response(e)

    # --- metrics ------------------------------------------------------------------------

    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        server = self

        class Collector:
            def collect(self):
                e = server.engine
                requests = CounterMetricFamily("wmgen_requests", "HTTP requests answered", labels=["route", "status"])
                for (route, status), count in sorted(server.requests.items()):
                    requests.add_metric([route, str(status)], count)
                yield requests
                yield CounterMetricFamily("wmgen_generated_tokens", "Tokens generated", value=e.generated)
                yield CounterMetricFamily("wmgen_prompt_tokens", "Prompt tokens read", value=e.prompt_tokens)
                yield CounterMetricFamily("wmgen_rows_finished", "Rows (completions) finished", value=e.finished)
                yield GaugeMetricFamily("wmgen_tokens_per_second", "Tokens generated per second, over the last 10 s", value=e.tokens_per_s)
                yield GaugeMetricFamily("wmgen_queue_length", "Requests waiting for a row", value=e.queued)
                yield GaugeMetricFamily("wmgen_batch_rows", "Rows in the running batch", value=e.active_rows)
                yield GaugeMetricFamily("wmgen_batch_rows_max", "The most rows run at once (--max-rows)", value=e.max_rows)
                yield GaugeMetricFamily("wmgen_sessions_held", "Sessions held live", value=len(e.held))

        registry = CollectorRegistry(auto_describe=True)
        registry.register(Collector())  # type: ignore[arg-type]
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class Choices:
    """What each row of a completion has given so far, and the OpenAI records of it."""

    def __init__(self, lm: Model, rows: int, prefixes: list[str], logprobs: int | None, *, chat: bool = False):
        self.lm, self.logprobs, self.chat = lm, logprobs, chat
        self.text = list(prefixes)
        self.reason: list[str | None] = [None] * rows
        self.tokens: list[list[str]] = [[] for _ in range(rows)]
        self.token_logprobs: list[list[float | None]] = [[] for _ in range(rows)]
        self.top: list[list[dict | None]] = [[] for _ in range(rows)]
        self.offsets: list[list[int]] = [[] for _ in range(rows)]
        self.pending_top: list[list] = [[] for _ in range(rows)]
        self.prompt_tokens = [0] * rows
        self.generated = [0] * rows
        self.seeds = [0] * rows
        self.unread = [0] * rows
        self.finished: list[Finished | None] = [None] * rows
        self.echoed = [bool(p) for p in prefixes]
        self.prefixes = prefixes

    def _note(self, k: int, token: int, lp: float | None, top: list) -> None:
        piece = self.lm.decode([token])
        self.offsets[k].append(sum(len(t) for t in self.tokens[k]))
        self.tokens[k].append(piece)
        self.token_logprobs[k].append(lp)
        self.top[k].append({self.lm.decode([t]): v for t, v in top} if self.logprobs else None)

    def take(self, kind: str, k: int, value) -> list[dict]:
        """Note one delivery; the stream pieces it makes (a choice each)."""
        if kind == "top":
            self.pending_top[k] = value
            return []
        if kind == "job":
            return []
        if kind == "prompt":
            return self._prompt(k, value)
        if isinstance(value, Started):
            self.prompt_tokens[k], self.seeds[k], self.unread[k] = value.prompt_tokens, value.seed, value.unread
            return []
        if isinstance(value, Evicted):
            return []
        if isinstance(value, Token):
            self.generated[k] += 1
            if self.logprobs is not None:
                self._note(k, value.id, value.logprob, self.pending_top[k])
            return self._piece(k, value.text, None, token=value)
        if isinstance(value, Finished):
            self.finished[k] = value
            self.reason[k] = finish_reason(value.reason)
            return self._piece(k, value.text, self.reason[k])
        return []

    def _prompt(self, k: int, scored: list) -> list[dict]:
        ids = self.lm.tokenizer.encode(self.prefixes[k])
        for token, item in zip(ids, scored):
            lp, top = (None, []) if item is None else item
            self._note(k, token, lp, top)
        return []

    def _piece(self, k: int, text: str, reason: str | None, token: Token | None = None) -> list[dict]:
        first = self.echoed[k]
        if first:
            text, self.echoed[k] = self.prefixes[k] + text, False
        self.text[k] += text if not first else text[len(self.prefixes[k]) :]
        if not text and reason is None:
            return []
        if self.chat:
            return [{"index": k, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": reason}]
        piece: dict[str, Any] = {"index": k, "text": text, "logprobs": None, "finish_reason": reason}
        if self.logprobs is not None and token is not None:
            piece["logprobs"] = {"tokens": self.tokens[k][-1:], "token_logprobs": self.token_logprobs[k][-1:],
                                 "top_logprobs": self.top[k][-1:], "text_offset": self.offsets[k][-1:]}
        return [piece]

    def choice(self, k: int) -> dict:
        logprobs = None
        if self.logprobs is not None:
            logprobs = {"tokens": self.tokens[k], "token_logprobs": self.token_logprobs[k], "top_logprobs": self.top[k],
                        "text_offset": self.offsets[k]}
        return {"index": k, "text": self.text[k], "logprobs": logprobs, "finish_reason": self.reason[k]}

    def message(self, k: int) -> dict:
        content = self.text[k].removeprefix(" ")
        return {"index": k, "message": {"role": "assistant", "content": content}, "logprobs": None, "finish_reason": self.reason[k]}

    def usage(self) -> dict:
        prompt, completion = sum(self.prompt_tokens), sum(self.generated)  # each row reads its prompt itself
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def extra(self, engine: Engine) -> dict:
        """wmgen's own account of each row: seed, why it ended, what the memory did."""
        rows = []
        for k, f in enumerate(self.finished):
            if f is None:
                continue
            rows.append({"index": k, "seed": self.seeds[k], "reason": f.reason, "unread": self.unread[k], "fill": f.fill,
                         "capacity": f.capacity, "evictions": f.evictions, "evicted": f.evicted})
        return {"choices": rows}


def finish_reason(reason: str) -> str:
    """wmgen's reason, in OpenAI's words: "stop" (a stop text or the end of text),
    "length" (max_tokens); "interrupted" (the server is stopping, or the request was
    stopped) has no OpenAI word and keeps its own."""
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


def chat_transcript(messages, template) -> str:
    """Chat messages as the plain transcript `wmgen chat --template chat` reads:
    system messages as lines of their own, then "User: ..." and "Bot: ..." lines,
    ending with "Bot:" for the model to go on; the model's turn ends where it
    starts a "\\nUser:" line."""
    if not isinstance(messages, list) or not messages:
        raise Invalid("messages: expected a non-empty list of {\"role\", \"content\"}", param="messages")
    lines = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise Invalid(f"messages[{i}]: expected an object with a role and a content", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise Invalid(f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise Invalid(f"messages[{i}].content: expected a string", param="messages")
        role = m["role"]
        if role in ("system", "developer"):
            lines.append(content)
        elif role == "user":
            lines.append(f"{template.user} {content}")
        elif role == "assistant":
            lines.append(f"{template.bot} {content}")
        else:
            raise Invalid(f"messages[{i}].role: {role!r} is not one of system, developer, user, assistant", param="messages")
    return "\n".join(lines) + "\n" + template.bot


class _Lines:
    """A text stream that keeps what is written, for `JsonlWriter`."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def take(self) -> str:
        out, self.parts = "".join(self.parts), []
        return out


def _json_kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def _random_id() -> str:
    import secrets

    return secrets.token_hex(12)


def log_line(line: str) -> None:
    try:
        print(f"wmgen: {line}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass

