"""HTTP server: the OpenAI API over many MoS adapters resident on one base.

    moslora serve --adapters ADAPTER_ROOT [--model MODEL] [--port 8000]

Every subdirectory of ``ADAPTER_ROOT`` that holds an MoS adapter is servable under its
directory name, and loaded on the first request that names it (``MultiAdapterModel``'s
adapter root): start-up reads no adapter, resident ones are kept within
``--max-resident-bytes`` (least recently used evicted), and directories added or removed while
the server runs are seen within a second. ``POST /v1/adapters`` loads one explicitly (from
under the same root only; it then stays resident until deleted). With
``allow_runtime_adapters`` (``--allow-runtime-adapters``), vLLM's ``POST /v1/load_lora_adapter``
and ``POST /v1/unload_lora_adapter`` do the same with vLLM's bodies and answers; without it
they are 404, as in vLLM. An adapter loaded over HTTP that is unloaded stops being served at
once, while the requests already made to it finish with it. ``POST
/v1/completions`` and ``POST /v1/chat/completions`` (the base tokenizer's chat template) take
OpenAI's bodies, with ``model`` naming an adapter or ``__base__``; ``GET /v1/models[/{id}]``
lists them. Requests from all clients go into one bounded queue; a single worker thread answers
it by continuous batching (``scheduler``): a request joins the running mixed-adapter batch at
the next decoding step, up to ``max_batch`` rows (an idle server waits ``batch_window`` seconds
for company), and leaves it when it is done, so a short request never waits for a long one.
Every choice of every request is a row with its own adapter, KV cache rows, sampling, stop
strings and stream (``decoding``). A full queue answers 503 at once, so a burst is refused,
not left to time out.

Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}``: 400 for anything wrong
with a request (malformed JSON, a wrong type, an unknown or unsupported field, a limit), 401 for
a missing or wrong key, 404 for an unknown model, 413 for a body over the byte limit, 503 for a
full queue, 504 when no answer came in time (the request is dropped if still queued, and its
rows stop if running), 500 with a generic message for anything unexpected (the traceback goes
to the server log, never to the client). Adapters load only from directories under the root,
after symlinks are resolved, with their files also under it.

Keys (optional): ``{"*": key}`` protects every model and the adapter endpoints,
``{name: key}`` one adapter; a model with neither key is open. Clients send
``Authorization: Bearer KEY``.

``GET /metrics`` is Prometheus' text format (``metrics``); ``GET /metrics.json`` the totals as JSON.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import queue
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, ClassVar

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import Field
from starlette.exceptions import HTTPException

from ..checkpoint import CheckpointError
from ..config import require_float, require_int
from .decoding import Sampling
from .kernel import available as decode_kernel_available
from .metrics import UNKNOWN, ServerMetrics
from .multi import BASE, MultiAdapterModel, UnknownAdapterError
from .openai_api import (ApiError, ChatRequest, CompletionRequest, StrictBody, choice, delta, load_json, sse, usage,
                         validate)
from .root import AdapterRoot
from .scheduler import PROMPT_CACHE_BYTES, Choice, Job, Scheduler, servable

KEYS_ENV = "MOSLORA_API_KEYS"  # JSON {"*" or adapter name: key}
log = logging.getLogger("moslora.serving")


# ---------------------------------------------------------------------------- requests


class AdapterRequest(StrictBody):
    name: str = Field(min_length=1, max_length=128)
    path: str = Field(min_length=1, max_length=4096,
                      description="adapter directory, relative to the server's adapter root")


class LoadLoraRequest(StrictBody):
    """vLLM's body of ``POST /v1/load_lora_adapter``."""

    unsupported: ClassVar[dict[str, Any]] = {"load_inplace": False}

    lora_name: str = Field(min_length=1, max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096,
                           description="adapter directory under the server's adapter root (absolute or relative to it)")


class UnloadLoraRequest(StrictBody):
    """vLLM's body of ``POST /v1/unload_lora_adapter``."""

    unsupported: ClassVar[dict[str, Any]] = {"lora_int_id": None}

    lora_name: str = Field(min_length=1, max_length=128)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how long it may wait; validated at construction."""

    max_body_bytes: int = 65_536
    max_prompt_chars: int = 16_384
    max_prompt_tokens: int = 1024
    max_tokens: int = 1024
    max_n: int = 8
    request_timeout: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_chars", "max_prompt_tokens", "max_tokens", "max_n"):
            require_int(name, getattr(self, name), minimum=1)
        require_float("request_timeout", self.request_timeout, low=0.0, low_open=True)


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before it is all read,
    whether its Content-Length says so or it streams more than it declared (chunked)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.limit:
            response = JSONResponse(ApiError(413, self._message()).body(), status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # the app's handler turns this into the 413 response
                raise ApiError(413, self._message())
            return message

        await self.app(scope, limited, send)

    def _message(self) -> str:
        return f"request body too large: the limit is {self.limit} bytes"


# ---------------------------------------------------------------------------- keys


class ApiKeys:
    """Which bearer key each model needs; see the module docstring."""

    def __init__(self, keys: dict[str, str] | None = None) -> None:
        self.keys = dict(keys or {})

    @classmethod
    def load(cls, path: Path | None = None) -> "ApiKeys":
        """Keys from a JSON file, else from the ``MOSLORA_API_KEYS`` variable, else none."""
        text = path.read_text() if path is not None else os.environ.get(KEYS_ENV)
        keys = json.loads(text) if text else {}
        if not isinstance(keys, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in keys.items()):
            raise ValueError('API keys must be a JSON object {"*" or adapter name: non-empty key}')
        return cls(keys)

    def allows(self, model: str, authorization: str | None) -> bool:
        """Whether ``authorization`` opens ``model`` (``"*"``: the adapter endpoints)."""
        wanted = [k for k in (self.keys.get(model), self.keys.get("*")) if k]
        if not wanted:
            return True
        token = (authorization or "").removeprefix("Bearer ").strip()
        return any(hmac.compare_digest(token.encode(), k.encode()) for k in wanted)


# ---------------------------------------------------------------------------- app


def create_app(
    model: MultiAdapterModel,
    tokenizer: Any,
    adapter_root: str | Path,
    keys: ApiKeys | None = None,
    max_batch: int = 16,
    batch_window: float = 0.005,
    queue_size: int = 256,
    limits: Limits | None = None,
    allow_runtime_adapters: bool = False,
    prompt_cache_bytes: int = PROMPT_CACHE_BYTES,
) -> FastAPI:
    """The FastAPI app over ``model``. The worker thread runs while the app does (lifespan).
    ``allow_runtime_adapters`` adds vLLM's ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``."""
    limits = limits or Limits()
    require_int("max_batch", max_batch, minimum=1)
    require_int("queue_size", queue_size, minimum=1)
    require_float("batch_window", batch_window, low=0.0)
    root = AdapterRoot(adapter_root)
    keys = keys or ApiKeys()
    require_int("prompt_cache_bytes", prompt_cache_bytes, minimum=0)
    scheduler = Scheduler(model, tokenizer, max_batch, batch_window, queue_size, prompt_cache_bytes)
    metrics = ServerMetrics()
    started = int(time.time())
    loaded_at: dict[str, int] = {}  # adapters loaded over HTTP; the rest came with the server
    retiring: set[str] = set()  # being unloaded: no longer served, while their requests in flight finish

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="moslora", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)

    def count_failure(request: Request, status: int) -> None:
        """Count an error of a generation endpoint (``answer`` notes which, and for what model)."""
        endpoint = getattr(request.state, "endpoint", None)
        if endpoint is not None:
            metrics.failed(request.state.model, endpoint, status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        count_failure(request, exc.status)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # the router's own answers (unknown path 404, wrong method 405), in OpenAI's shape
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this; the client learns nothing of the internals
        count_failure(request, 500)
        return JSONResponse(ApiError(500, "internal server error").body(), status_code=500)

    def admin(authorization: str | None = Header(None)) -> None:
        if not keys.allows("*", authorization):
            raise ApiError(401, "this endpoint needs the global API key", code="invalid_api_key")

    def label(name: Any) -> str:
        """``name`` if it names a model, else ``UNKNOWN`` (metrics labels stay few)."""
        served = isinstance(name, str) and name in servable(model) and name not in retiring
        return name if served else UNKNOWN

    def encode(req: CompletionRequest | ChatRequest) -> list[int]:
        if isinstance(req, CompletionRequest):
            return tokenizer(req.prompt)["input_ids"]
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "the base model's tokenizer has no chat template, so messages cannot be "
                                "formatted: use /v1/completions with a prompt", param="messages",
                           code="no_chat_template")
        try:
            return tokenizer.apply_chat_template([m.for_template() for m in req.messages], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"]
        except TemplateError as err:  # the template's own check, e.g. roles that must alternate
            raise ApiError(400, f"the chat template refused the messages: {err}", param="messages") from None

    def sampling(req: CompletionRequest | ChatRequest) -> Sampling:
        """The request's decoding, checked against the server's limits."""
        max_tokens = req.new_tokens() or limits.max_tokens
        if max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens={max_tokens} is over the limit of {limits.max_tokens}", param="max_tokens")
        if req.n > limits.max_n:
            raise ApiError(400, f"n={req.n} is over the limit of {limits.max_n}", param="n")
        return Sampling(max_tokens, req.temperature, req.top_p, req.seed, req.stops())

    def prompt_ids(req: CompletionRequest | ChatRequest) -> list[int]:
        param = "prompt" if isinstance(req, CompletionRequest) else "messages"
        if req.characters() > limits.max_prompt_chars:
            raise ApiError(400, f"prompt has {req.characters()} characters, the limit is {limits.max_prompt_chars}",
                           param=param)
        ids = encode(req)
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"prompt has {len(ids)} tokens, the limit is {limits.max_prompt_tokens}", param=param)
        return ids

    async def answer(request: Request, kind: type[CompletionRequest] | type[ChatRequest], endpoint: str,
                     authorization: str | None) -> Any:
        """Both generation endpoints: parse, check, queue, then stream or wait for the answer."""
        arrived = time.perf_counter()
        request.state.endpoint, request.state.model = endpoint, UNKNOWN
        try:
            body = load_json(await request.body())
            request.state.model = label(body.get("model"))
        finally:  # counted even when the body is not JSON (under no model)
            metrics.requests.labels(request.state.model, endpoint).inc()
        req = validate(body, kind)
        if not keys.allows(req.model, authorization):
            raise ApiError(401, f"model {req.model!r} needs a valid API key", code="invalid_api_key")
        if request.state.model == UNKNOWN:
            raise ApiError(404, f"no model {req.model!r}; see GET /v1/models", param="model", code="model_not_found")
        job = Job(req.model, prompt_ids(req), sampling(req), req.n)
        reply = Reply(kind is ChatRequest, req.model, len(job.prompt_ids), req.include_usage())
        events: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
        if req.stream:
            loop = asyncio.get_running_loop()
            job.on_text = lambda i, text: loop.call_soon_threadsafe(events.put_nowait, (i, text))
            job.future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
        try:
            scheduler.submit(job)
        except queue.Full:
            raise ApiError(503, "server busy: the request queue is full, retry later", code="queue_full") from None

        def done(choices: list[Choice]) -> None:
            metrics.answered(request.state.model, endpoint, time.perf_counter() - arrived, len(job.prompt_ids),
                             sum(c.tokens for c in choices))

        if req.stream:
            stream = reply.stream(job, events, limits.request_timeout, done,
                                  lambda status: metrics.failed(request.state.model, endpoint, status))
            return StreamingResponse(stream, media_type="text/event-stream")
        try:
            # on timeout wait_for cancels the future, so a still-queued job is never generated
            choices = await asyncio.wait_for(asyncio.wrap_future(job.future), limits.request_timeout)
        except (UnknownAdapterError, asyncio.TimeoutError) as err:
            job.abandoned.set()  # a running job's rows stop at their next token
            raise _job_error(err, limits.request_timeout) from None
        done(choices)
        return reply.whole(choices)

    @app.post("/v1/completions")
    async def completions(request: Request, authorization: str | None = Header(None)) -> Any:
        return await answer(request, CompletionRequest, "completions", authorization)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, authorization: str | None = Header(None)) -> Any:
        return await answer(request, ChatRequest, "chat_completions", authorization)

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": loaded_at.get(name, started), "owned_by": "moslora"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card(name) for name in [BASE, *model.available()] if name not in retiring]}

    @app.get("/v1/models/{name}")
    async def model_info(name: str) -> dict:
        if label(name) == UNKNOWN:
            raise ApiError(404, f"no model {name!r}; see GET /v1/models", param="model", code="model_not_found")
        return card(name)

    async def add_adapter(name: str, relative: str) -> None:
        """Validate the adapter at ``relative`` (under the root) against the base and keep it
        resident as ``name`` until unloaded; the registry is unchanged on any error (an
        ``ApiError``: 400, 404 for no adapter there, 409 for a name already loaded)."""
        try:  # resolves "..", absolute paths and symlinks, of the adapter's files too
            path = root.inside(relative)
        except CheckpointError as err:
            raise ApiError(400, str(err), param="path") from None
        if name in model.adapters():
            raise ApiError(409, f"an adapter named {name!r} is already loaded", param="name")
        try:
            await asyncio.to_thread(model.load_adapter, name, path)
        except FileNotFoundError as err:
            raise ApiError(404, str(err).replace(str(root.path), "<root>"), param="path") from None
        except CheckpointError as err:
            raise ApiError(400, str(err).replace(str(root.path), "<root>"), param="path") from None
        except ValueError as err:  # an invalid name, or one loaded meanwhile
            raise ApiError(400, str(err), param="name") from None
        loaded_at[name] = int(time.time())

    async def drop_adapter(name: str) -> None:
        """Unload the resident adapter ``name`` (``ApiError`` 404 if none, 409 if merged).

        One that would not stay servable from disk (the model's adapter root) is retired first:
        it leaves ``/v1/models`` and new requests for it are 404, while those already queued or
        running finish with it (for at most ``request_timeout``, after which any left fail with
        a 404). One on disk stays servable, and is loaded again by the next request naming it."""
        if name not in model.adapters():
            raise ApiError(404, f"no adapter named {name!r} is loaded; loaded: {model.adapters()}", param="name")
        drain = model.root is None or name not in model.root
        if drain:
            retiring.add(name)
        try:
            deadline = time.monotonic() + limits.request_timeout
            while drain and scheduler.in_flight(name) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(model.unload_adapter, name)  # waits for the model between two steps
        except UnknownAdapterError as err:  # unloaded meanwhile
            raise ApiError(404, str(err), param="name") from None
        except RuntimeError as err:  # merged into the base
            raise ApiError(409, str(err), param="name") from None
        finally:
            retiring.discard(name)
        loaded_at.pop(name, None)

    @app.post("/v1/adapters", dependencies=[Depends(admin)])
    async def load(request: Request) -> dict:
        """Load ``{"name", "path"}``: the adapter at ``path`` under the root, served as ``name``."""
        req = validate(load_json(await request.body()), AdapterRequest)
        await add_adapter(req.name, req.path)
        return {"id": req.name, "object": "model", "loaded": True}

    @app.delete("/v1/adapters/{name}", dependencies=[Depends(admin)])
    async def unload(name: str) -> dict:
        """Unload the resident adapter ``name`` (see ``drop_adapter``)."""
        await drop_adapter(name)
        return {"id": name, "object": "model", "deleted": True}

    if allow_runtime_adapters:  # else no such routes: 404, as vLLM without VLLM_ALLOW_RUNTIME_LORA_UPDATING

        @app.post("/v1/load_lora_adapter", dependencies=[Depends(admin)])
        async def load_lora_adapter(request: Request) -> PlainTextResponse:
            """vLLM's runtime load: ``{"lora_name", "lora_path"}`` serves the adapter at
            ``lora_path`` (under the adapter root, absolute or relative to it) as ``lora_name``.

            Validated as any adapter is on first use; a name already served (``GET
            /v1/models``), a path outside the root or with no adapter, a corrupt adapter, or
            one for another base is a 400 that leaves the registry unchanged. Answers vLLM's
            plain-text success message."""
            req = validate(load_json(await request.body()), LoadLoraRequest)
            if req.lora_name in servable(model):  # also one on disk under the root, or being unloaded
                raise ApiError(400, f"the adapter {req.lora_name!r} is already served (see GET /v1/models): "
                                    "unload it first or pick another lora_name", param="lora_name")
            try:
                await add_adapter(req.lora_name, req.lora_path)
            except ApiError as err:  # vLLM answers every refused load 400
                raise ApiError(400, err.message, param=f"lora_{err.param}", code=err.code) from None
            return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

        @app.post("/v1/unload_lora_adapter", dependencies=[Depends(admin)])
        async def unload_lora_adapter(request: Request) -> PlainTextResponse:
            """vLLM's runtime unload: ``{"lora_name"}``, a resident adapter (else 404).

            New requests for it are 404 at once; those already queued or running finish with it,
            then it is unloaded and this answers vLLM's plain-text success message. An adapter
            served from its directory under the root is a 400: it would stay served."""
            req = validate(load_json(await request.body()), UnloadLoraRequest)
            if model.root is not None and req.lora_name in model.root:
                raise ApiError(400, f"the adapter {req.lora_name!r} is served from its directory under the adapter "
                                    "root: remove the directory to stop serving it", param="lora_name")
            try:
                await drop_adapter(req.lora_name)
            except ApiError as err:
                raise ApiError(404 if err.status == 404 else 400, err.message, param="lora_name",
                               code=err.code) from None
            return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "adapters": len(model.adapters()), "queue_depth": scheduler.queue.qsize()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        text = metrics.exposition(scheduler.queue.qsize(), model.memory_report(), model.stats, len(model.available()))
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.get("/metrics.json")
    async def metrics_json() -> dict:
        return {**metrics.summary(), "queue_depth": scheduler.queue.qsize(), "adapters": model.adapters(),
                "available": len(model.available()), "memory_bytes": model.memory_report(),
                "residency": dataclasses.asdict(model.stats), "prompt_cache": scheduler.prompts.summary()}

    return app


def _job_error(err: Exception, timeout: float) -> ApiError:
    """What a client is told when its job was not answered: its adapter went away, or time ran out."""
    if isinstance(err, UnknownAdapterError):
        return ApiError(404, str(err), param="model", code="model_not_found")
    return ApiError(504, f"no answer within {timeout:g} s; the request was dropped, retry later",
                    code="timeout")


@dataclass
class Reply:
    """The OpenAI body of one answer, whole or as server-sent chunks."""

    chat: bool
    model: str
    prompt_tokens: int
    include_usage: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def whole(self, choices: list[Choice]) -> dict[str, Any]:
        return {**self._head("chat.completion" if self.chat else "text_completion"),
                "choices": [choice(self.chat, i, c.text, c.finish) for i, c in enumerate(choices)],
                "usage": usage(self.prompt_tokens, sum(c.tokens for c in choices))}

    async def stream(self, job: Job, events: asyncio.Queue, timeout: float, done: Callable[[list[Choice]], None],
                     failed: Callable[[int], None]) -> AsyncIterator[str]:
        """The chunks as ``job`` generates; an error after the first byte is an error event
        (which the OpenAI client raises), as the status line is already sent."""
        deadline = time.monotonic() + timeout
        try:
            if self.chat:
                for i in range(job.n):
                    yield self._chunk([delta(True, i, first=True)])
            while (event := await asyncio.wait_for(events.get(), deadline - time.monotonic())) is not None:
                yield self._chunk([delta(self.chat, event[0], text=event[1])])
            choices = job.future.result()  # raises the job's error
            yield self._chunk([delta(self.chat, i, finish=c.finish) for i, c in enumerate(choices)])
            if self.include_usage:
                yield self._chunk([], usage=usage(self.prompt_tokens, sum(c.tokens for c in choices)))
            done(choices)  # counted before the last event, which a client may not wait for
            yield sse("[DONE]")
        except (UnknownAdapterError, asyncio.TimeoutError) as err:
            error = _job_error(err, timeout)
            failed(error.status)
            yield sse(error.body())
        except Exception:
            log.exception("a streamed request failed")
            failed(500)
            yield sse(ApiError(500, "internal server error").body())
        finally:  # also when the client goes away: a queued job is dropped, a running one stops
            job.future.cancel()
            job.abandoned.set()

    def _chunk(self, choices: list[dict], **extra: Any) -> str:
        head = self._head("chat.completion.chunk" if self.chat else "text_completion")
        if self.include_usage:
            extra.setdefault("usage", None)  # OpenAI's chunks carry usage: null until the last
        return sse({**head, "choices": choices, **extra})

    def _head(self, kind: str) -> dict[str, Any]:
        prefix = "chatcmpl" if self.chat else "cmpl"
        return {"id": f"{prefix}-{self.id}", "object": kind, "created": self.created, "model": self.model}


# ---------------------------------------------------------------------------- entry point


def load_server(base: str | None, adapter_root: str | Path, keys: ApiKeys | None = None,
                max_resident_bytes: int | None = None, **app_kwargs: Any) -> FastAPI:
    """Load the base (a local HF folder, a .gguf file, or ``None`` for the embedded default;
    ``base.load_base``) and serve every MoS adapter under ``adapter_root``, each loaded on its
    first request (validated then) and kept resident within ``max_resident_bytes``;
    ``app_kwargs`` go to ``create_app``."""
    from ..base import load_base

    base_model, tokenizer = load_base(base)
    model = MultiAdapterModel(base_model.eval(), adapter_root=adapter_root, max_resident_bytes=max_resident_bytes)
    decode_kernel_available()  # load (or build) the decode op now, not on the first request
    return create_app(model, tokenizer, adapter_root, keys, **app_kwargs)
