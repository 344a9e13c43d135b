"""HTTP server: OpenAI-style completions over many MoS adapters resident on one base.

    moslora serve --adapters ADAPTER_ROOT [--base MODEL] [--port 8000]

Every subdirectory of ``ADAPTER_ROOT`` that holds an MoS adapter is loaded at start under its
directory name; more can be loaded later, from under the same root only. Requests from all
clients go into one bounded queue; a single worker thread takes up to ``max_batch`` of them,
waiting at most ``batch_window`` seconds for company, and answers them with one mixed-adapter
``generate`` call. A full queue answers 503 at once, so a burst is refused, not left to time
out. Decoding is greedy.

Limits (``create_app`` arguments, ``moslora serve`` options): request body bytes (413), one
prompt per request, prompt characters and tokens, ``max_tokens`` (422), queue length (503) and
time to answer (504: the request is dropped if still queued). Adapters load only from
directories under the root, after symlinks are resolved, with their files also under it. An
unexpected error answers 500 with a generic JSON body; the traceback goes to the server log,
never to the client.

Keys (optional): ``{"*": key}`` protects every model and the adapter endpoints,
``{name: key}`` one adapter; a model with neither key is open. Clients send
``Authorization: Bearer KEY``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import queue
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import torch
from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from ..config import require_float, require_int
from .multi import BASE, MultiAdapterModel, UnknownAdapterError

KEYS_ENV = "MOSLORA_API_KEYS"  # JSON {"*" or adapter name: key}


# ---------------------------------------------------------------------------- requests


class CompletionRequest(BaseModel):
    model: str = Field(min_length=1, max_length=128, description=f"an adapter name, or {BASE!r} for the base model")
    prompt: str = Field(min_length=1, description="one prompt (a list is refused)")
    max_tokens: int = Field(16, ge=1, description="at most the server's max_tokens limit")
    temperature: float = Field(0.0, ge=0.0, le=0.0, description="only greedy decoding (0) is served")


class AdapterRequest(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    path: str = Field(min_length=1, max_length=4096,
                      description="adapter directory, relative to the server's adapter root")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how long it may wait; validated at construction."""

    max_body_bytes: int = 65_536
    max_prompt_chars: int = 16_384
    max_prompt_tokens: int = 1024
    max_tokens: int = 1024
    request_timeout: float = 60.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_chars", "max_prompt_tokens", "max_tokens"):
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
            response = JSONResponse({"detail": self._message()}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # FastAPI turns this into the 413 response
                raise HTTPException(413, self._message())
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


# ---------------------------------------------------------------------------- batching


@dataclass
class Job:
    """One completion waiting in the queue; the worker answers it through ``future``."""

    model: str
    prompt_ids: list[int]
    max_tokens: int
    future: Future = field(default_factory=Future)


class Batcher:
    """A bounded queue and the worker thread that answers it in mixed-adapter batches."""

    def __init__(self, model: MultiAdapterModel, pad_id: int, eos_id: int | None,
                 max_batch: int = 16, batch_window: float = 0.005, queue_size: int = 256) -> None:
        self.model, self.pad_id, self.eos_id = model, pad_id, eos_id
        self.max_batch, self.batch_window = max_batch, batch_window
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, job: Job) -> Future:
        """Queue ``job``; raises ``queue.Full`` when the queue is at capacity."""
        self.queue.put_nowait(job)
        return job.future

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="moslora-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                jobs = [self.queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            deadline = time.monotonic() + self.batch_window
            while len(jobs) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    jobs.append(self.queue.get(timeout=left))
                except queue.Empty:
                    break
            self._answer(jobs)

    def _answer(self, jobs: list[Job]) -> None:
        # a job whose client gave up (timeout) is dropped; the rest can no longer be cancelled
        jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]
        loaded = set(self.model.adapters()) | {BASE}
        for job in [j for j in jobs if j.model not in loaded]:  # unloaded while queued
            job.future.set_exception(UnknownAdapterError(f"no adapter named {job.model!r} is loaded"))
        jobs = [j for j in jobs if j.model in loaded]
        if not jobs:
            return
        try:
            results = self._generate(jobs)
        except Exception as err:  # every waiting client must get an answer, whatever went wrong
            for job in jobs:
                job.future.set_exception(err)
            return
        for job, result in zip(jobs, results):
            job.future.set_result(result)

    def _generate(self, jobs: list[Job]) -> list[tuple[list[int], str]]:
        """Left-pad the prompts, run one greedy ``generate``; each job's tokens and finish
        reason. Greedy rows do not depend on each other, so cutting a row at its own
        ``max_tokens`` gives what it would have alone."""
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.tensor([[self.pad_id] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs])
        mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs])
        out = self.model.generate(
            ids, attention_mask=mask, adapter_names=[j.model for j in jobs],
            max_new_tokens=max(j.max_tokens for j in jobs), do_sample=False,
            pad_token_id=self.pad_id, eos_token_id=self.eos_id,
        )
        results = []
        for job, row in zip(jobs, out[:, width:].tolist()):
            tokens = row[: job.max_tokens]
            if self.eos_id is not None and self.eos_id in tokens:
                results.append((tokens[: tokens.index(self.eos_id)], "stop"))
            else:
                results.append((tokens, "length"))
        return results


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
) -> FastAPI:
    """The FastAPI app over ``model``. The worker thread runs while the app does (lifespan)."""
    limits = limits or Limits()
    require_int("max_batch", max_batch, minimum=1)
    require_int("queue_size", queue_size, minimum=1)
    require_float("batch_window", batch_window, low=0.0)
    root = Path(adapter_root).resolve()
    keys = keys or ApiKeys()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batcher = Batcher(model, pad_id, tokenizer.eos_token_id, max_batch, batch_window, queue_size)
    metrics: Counter[str] = Counter()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="moslora", lifespan=lifespan)
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # where and what, without echoing the input: FastAPI's own handler fails with a 500 on
        # a body that is not UTF-8, and would reflect whatever a client sent
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this; the client learns nothing of the internals
        metrics["internal_errors"] += 1
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    def admin(authorization: str | None = Header(None)) -> None:
        if not keys.allows("*", authorization):
            raise HTTPException(403, "this endpoint needs the global API key")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, authorization: str | None = Header(None)) -> dict:
        metrics["requests"] += 1
        if not keys.allows(req.model, authorization):
            raise HTTPException(403, f"model {req.model!r} needs a valid API key")
        if req.model != BASE and req.model not in model.adapters():
            raise HTTPException(404, f"no model {req.model!r}; see GET /v1/models")
        if req.max_tokens > limits.max_tokens:
            raise HTTPException(422, f"max_tokens={req.max_tokens} is over the limit of {limits.max_tokens}")
        if len(req.prompt) > limits.max_prompt_chars:
            raise HTTPException(422, f"prompt has {len(req.prompt)} characters, the limit is "
                                     f"{limits.max_prompt_chars}")
        prompt_ids = tokenizer(req.prompt)["input_ids"]
        if len(prompt_ids) > limits.max_prompt_tokens:
            raise HTTPException(422, f"prompt has {len(prompt_ids)} tokens, the limit is {limits.max_prompt_tokens}")
        try:
            future = batcher.submit(Job(req.model, prompt_ids, req.max_tokens))
        except queue.Full:
            metrics["rejected_queue_full"] += 1
            raise HTTPException(503, "server busy: the request queue is full, retry later") from None
        try:
            # on timeout wait_for cancels the future, so a still-queued job is never generated
            tokens, finish = await asyncio.wait_for(asyncio.wrap_future(future), limits.request_timeout)
        except UnknownAdapterError as err:
            raise HTTPException(404, str(err)) from None
        except asyncio.TimeoutError:
            metrics["timeouts"] += 1
            raise HTTPException(504, f"no answer within {limits.request_timeout:g} s; the request was "
                                     "dropped, retry later") from None
        metrics["prompt_tokens"] += len(prompt_ids)
        metrics["completion_tokens"] += len(tokens)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [{"index": 0, "text": tokenizer.decode(tokens, skip_special_tokens=True),
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(tokens),
                      "total_tokens": len(prompt_ids) + len(tokens)},
        }

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list",
                "data": [{"id": name, "object": "model", "owned_by": "moslora"} for name in [BASE, *model.adapters()]]}

    @app.post("/v1/adapters", dependencies=[Depends(admin)])
    async def load(req: AdapterRequest) -> dict:
        path = (root / req.path).resolve()  # resolves "..", absolute paths and symlinks
        # the files too: a symlinked adapter_config.json must not read from outside the root
        files = [(path / name).resolve() for name in (CONFIG_NAME, WEIGHTS_NAME)]
        if not all(p.is_relative_to(root) for p in (path, *files)):
            raise HTTPException(400, f"adapter path {req.path!r} is outside the adapter root")
        if req.name in model.adapters():
            raise HTTPException(409, f"an adapter named {req.name!r} is already loaded")
        try:
            await asyncio.to_thread(model.load_adapter, req.name, path)
        except FileNotFoundError as err:
            raise HTTPException(404, str(err).replace(str(root), "<root>")) from None
        except CheckpointError as err:
            raise HTTPException(400, str(err).replace(str(root), "<root>")) from None
        except ValueError as err:  # an invalid name
            raise HTTPException(422, str(err)) from None
        return {"id": req.name, "object": "model", "loaded": True}

    @app.delete("/v1/adapters/{name}", dependencies=[Depends(admin)])
    async def unload(name: str) -> dict:
        try:
            await asyncio.to_thread(model.unload_adapter, name)
        except UnknownAdapterError as err:
            raise HTTPException(404, str(err)) from None
        except RuntimeError as err:  # merged into the base
            raise HTTPException(409, str(err)) from None
        return {"id": name, "object": "model", "deleted": True}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "adapters": len(model.adapters()), "queue_depth": batcher.queue.qsize()}

    @app.get("/metrics")
    async def metrics_() -> dict:
        return {**metrics, "queue_depth": batcher.queue.qsize(), "adapters": model.adapters(),
                "memory_bytes": model.memory_report()}

    return app


# ---------------------------------------------------------------------------- entry point


def load_server(base: str | None, adapter_root: str | Path, keys: ApiKeys | None = None, **app_kwargs: Any) -> FastAPI:
    """Load the base (a local HF folder, a .gguf file, or ``None`` for the embedded default;
    ``train.load_base``) and every MoS adapter directly under ``adapter_root``; directories
    that are not MoS adapters are skipped with a note."""
    from ..train import load_base

    base_model, tokenizer = load_base(base)
    model = MultiAdapterModel(base_model.eval())
    for path in sorted(Path(adapter_root).iterdir()):
        if (path / CONFIG_NAME).is_file():
            try:
                model.load_adapter(path.name, path)
            except (CheckpointError, ValueError) as err:
                print(f"skipped {path}: {err}")
    return create_app(model, tokenizer, adapter_root, keys, **app_kwargs)
