"""The HTTP API of `anyshape serve`: OpenAI's completions and chat completions, answered at the
size each request asks for, from one copy of the weights.

    GET  /v1/models             the catalog's names: NAME (the whole model), NAME@B per named size
    POST /v1/completions        prompt (text or token ids) -> text
    POST /v1/chat/completions   messages, through the tokenizer's chat template -> a message
    GET  /health                200 while serving; 503 once shutting down
    GET  /metrics               Prometheus text: requests, tokens, tokens/s, waiting and running per size

Beyond OpenAI's fields, a request may give `budget` (a fraction of the parent's parameters) or
`max_latency_ms` (the largest named size whose decode step fits), and `degrade: true`: while its
size decodes a full batch already, a smaller named size with room answers; the response's `model`
names the size that answered. Errors have OpenAI's JSON body, {"error": {"message", "type",
"param", "code"}}, and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from anyshape.errors import AnyshapeError
from anyshape.runtime.chat import prompt_tokens, stop_tokens
from anyshape.runtime.generate import Sampling, TextStream
from anyshape.serve.catalog import Catalog
from anyshape.serve.engine import LENGTH, STOP, Closed, Engine, QueueFull
from anyshape.serve.engine import Request as Generation
from anyshape.shape import Shape

COMPLETION_MAX_TOKENS = 16  # OpenAI's default max_tokens of /v1/completions
DISCONNECT_POLL_S = 0.25  # how often a non-streaming answer checks that its client is still there
NEUTRAL = {  # OpenAI parameters the generator does not support, accepted at their no-op values
    "n": 1, "best_of": 1, "echo": False, "logprobs": False, "top_logprobs": 0, "frequency_penalty": 0,
    "presence_penalty": 0, "logit_bias": {}, "user": None, "parallel_tool_calls": None,
}  # fmt: skip


class ApiError(Exception):
    """An error answered with OpenAI's JSON error body."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, retry_after: int = 0
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = {"Retry-After": str(retry_after)} if retry_after else None

    def response(self) -> JSONResponse:
        kind = {400: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error"}
        body = {"message": self.message, "type": kind.get(self.status, "server_error"), "param": self.param}
        return JSONResponse({"error": {**body, "code": self.code}}, self.status, headers=self.headers)


class GenerationBody(BaseModel):
    """The fields both endpoints read; any other field is refused unless at its no-op value."""

    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    budget: float | None = None
    max_latency_ms: float | None = Field(None, gt=0)
    degrade: bool = False


class CompletionBody(GenerationBody):
    prompt: str | list[int]


class Message(BaseModel):
    role: str
    content: str


class ChatBody(GenerationBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


@dataclass
class Finished:
    reason: str  # STOP, LENGTH or an error's message


@dataclass
class StopText:
    """Text as it is generated, cut before the first of the `stops` strings: text that could
    still begin one is held back until it cannot."""

    stops: list[str]
    text: str = ""
    sent: int = 0  # characters given out
    stopped: bool = field(default=False, init=False)

    def add(self, piece: str) -> str:
        """The text that can be given out now; sets `stopped` once a stop string appears."""
        self.text += piece
        found = [i for i in (self.text.find(stop) for stop in self.stops) if i >= 0]
        if found:
            end, self.stopped = min(found), True
        else:
            end = max(self.sent, len(self.text) - max((len(stop) - 1 for stop in self.stops), default=0))
        out, self.sent = self.text[self.sent : end], end
        return out

    def rest(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


class Metrics:
    """Counters of the requests and tokens per size, and the engine's load per size, in one registry."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("anyshape_requests", "Requests answered", ["model"], registry=self.registry)
        self.prompt_tokens = Counter("anyshape_prompt_tokens", "Prompt tokens read", ["model"], registry=self.registry)
        self.generated = Counter("anyshape_generated_tokens", "Tokens generated", ["model"], registry=self.registry)
        self.names: dict[Shape, str] = {}  # each Shape by the first name it was asked by
        self.engine = engine
        self.registry.register(self)

    def collect(self):  # the engine's load, read when /metrics is asked
        waiting = GaugeMetricFamily("anyshape_waiting_requests", "Requests queued", labels=["model"])
        running = GaugeMetricFamily("anyshape_running_requests", "Requests being decoded", labels=["model"])
        rate = GaugeMetricFamily(
            "anyshape_tokens_per_second", "Tokens generated per second of the size's own steps", labels=["model"]
        )
        for shape, load in self.engine.load().items():
            name = [self.names.get(shape, shape.to_json())]
            waiting.add_metric(name, load.waiting)
            running.add_metric(name, load.running)
            rate.add_metric(name, load.tokens / load.seconds if load.seconds else 0.0)
        yield from (waiting, running, rate)


def create_app(catalog: Catalog, tokenizer: PreTrainedTokenizerBase, engine: Engine, max_tokens: int) -> FastAPI:
    """The API over a started `engine` of `catalog.model`; `max_tokens`: the most one request may ask for."""
    model = catalog.model
    context = getattr(model.config.hf, "max_position_embeddings", None) or 2048
    stops = stop_tokens(tokenizer, model)
    metrics = Metrics(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(engine.close)  # in-flight requests finish

    app = FastAPI(title="anyshape", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return error.response()

    @app.exception_handler(AnyshapeError)
    async def bad_input(request: Request, error: AnyshapeError) -> JSONResponse:
        return ApiError(400, str(error)).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        message = "the body is not valid JSON" if first.get("type") == "json_invalid" else first.get("msg", "invalid")
        return ApiError(400, f"{where}: {message}" if where else message, where).response()

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.closing:
            return JSONResponse({"status": "shutting down"}, 503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        sizes = {size.name: size for size in catalog.sizes} | {catalog.name: catalog.largest}
        return {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "anyshape",
                    "num_parameters": sizes[name].shape.num_parameters(model.config),
                    "decode_ms": round(sizes[name].decode_ms, 3),
                }
                for name in catalog.names
            ],
        }

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Any:
        prompt = body.prompt if isinstance(body.prompt, list) else tokenizer(body.prompt)["input_ids"]
        return await answer(body, list(prompt), body.max_tokens or COMPLETION_MAX_TOKENS, False, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Any:
        try:
            prompt = prompt_tokens(tokenizer, [message.model_dump() for message in body.messages])
        except AnyshapeError as error:
            raise ApiError(400, str(error), "messages") from None
        return await answer(body, prompt, body.max_completion_tokens or body.max_tokens, True, request)

    async def answer(body: GenerationBody, prompt: list[int], wanted: int | None, chat: bool, request: Request) -> Any:
        refuse_unsupported(body)
        if not prompt:
            raise ApiError(400, "the prompt is empty", "prompt")
        if any(not 0 <= token < model.config.vocab_size for token in prompt):
            raise ApiError(400, f"the prompt's token ids must lie in [0, {model.config.vocab_size})", "prompt")
        room = context - len(prompt)
        if room < 1:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; the model reads at most {context}", "prompt")
        count = wanted if wanted is not None else min(room, max_tokens)
        if count > min(room, max_tokens):
            raise ApiError(
                400, f"max_tokens={count} is too large: at most {min(room, max_tokens)} for this prompt of "
                f"{len(prompt)} tokens (context {context}, server limit {max_tokens})", "max_tokens",
            )  # fmt: skip
        name, shape, degraded_from = await size_for(body)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**62)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        generation = Generation(
            prompt, shape, count, Sampling(body.temperature, body.top_p, seed), stops,
            on_token=lambda token: loop.call_soon_threadsafe(events.put_nowait, token),
            on_finish=lambda reason: loop.call_soon_threadsafe(events.put_nowait, Finished(reason)),
        )  # fmt: skip
        try:
            engine.submit(generation)
        except QueueFull as error:
            raise ApiError(429, f"the server is busy ({error}); try again shortly", None, "queue_full", 1) from None
        except Closed as error:
            raise ApiError(503, str(error), code="shutting_down") from None
        metrics.names.setdefault(shape, name)
        metrics.requests.labels(name).inc()
        metrics.prompt_tokens.labels(name).inc(len(prompt))
        reply = Reply(name, degraded_from, len(prompt), chat)
        stop_text = StopText([body.stop] if isinstance(body.stop, str) else list(body.stop or []))
        pieces = text_pieces(generation, events, TextStream(tokenizer), stop_text, reply, name)
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(reply.events(pieces, usage), media_type="text/event-stream")
        return reply.whole(await whole_text(pieces, request))

    async def text_pieces(
        generation: Generation, events: asyncio.Queue, stream: TextStream, stop_text: StopText, reply: Reply, name: str
    ) -> AsyncIterator[str]:
        """The answer's text as it is generated; sets `reply.finish_reason` at its end."""
        try:
            while True:
                event = await events.get()
                if isinstance(event, Finished):
                    if event.reason not in (STOP, LENGTH):
                        raise ApiError(500, f"generation failed: {event.reason}", code="generation_failed")
                    piece = stop_text.add(stream.flush())
                    if piece := piece if stop_text.stopped else piece + stop_text.rest():
                        yield piece
                    reply.finish_reason = STOP if stop_text.stopped else event.reason
                    return
                reply.completion_tokens += 1
                metrics.generated.labels(name).inc()
                if piece := stop_text.add(stream.push(event)):
                    yield piece
                if stop_text.stopped:
                    reply.finish_reason = STOP
                    return
        finally:
            generation.cancelled = True  # a no-op once it has finished; frees its slot if the client left

    def refuse_unsupported(body: GenerationBody) -> None:
        unsupported = sorted(
            key for key, value in (body.model_extra or {}).items() if value is not None and NEUTRAL.get(key) != value
        )
        if unsupported:
            raise ApiError(400, f"unsupported parameters: {', '.join(unsupported)}", unsupported[0])

    async def size_for(body: GenerationBody) -> tuple[str, Shape, str | None]:
        """(name, Shape) that answers `body`, and the name it asked for if a smaller size stands in."""
        try:
            name, shape = await asyncio.to_thread(catalog.resolve, body.model, body.budget, body.max_latency_ms)
        except AnyshapeError as error:
            unknown = str(error).startswith("unknown model")
            raise ApiError(404 if unknown else 400, str(error), "model" if unknown else "budget",
                           "model_not_found" if unknown else None) from None  # fmt: skip
        if body.degrade and engine.busy(shape):
            params = shape.num_parameters(model.config)
            for size in catalog.sizes:  # largest first
                if size.shape.num_parameters(model.config) < params and not engine.busy(size.shape):
                    return size.name, size.shape, name
        return name, shape, None

    return app


async def whole_text(pieces: AsyncIterator[str], request: Request) -> str:
    """The answer's whole text; if the client leaves first, its generation stops (its slot is freed)."""
    collect = asyncio.ensure_future(_joined(pieces))
    while not (await asyncio.wait({collect}, timeout=DISCONNECT_POLL_S))[0]:
        if await request.is_disconnected():
            collect.cancel()  # text_pieces' `finally` cancels the generation
            raise ApiError(499, "the client closed the connection", code="client_closed")
    return collect.result()


async def _joined(pieces: AsyncIterator[str]) -> str:
    return "".join([piece async for piece in pieces])


@dataclass
class Reply:
    """An answer's OpenAI JSON: whole, or as server-sent events."""

    model: str
    degraded_from: str | None
    prompt_tokens: int
    chat: bool
    completion_tokens: int = 0
    finish_reason: str | None = None
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def whole(self, text: str) -> dict[str, Any]:
        choice = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text, "logprobs": None}
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._head(kind), "choices": [{"index": 0, **choice, "finish_reason": self.finish_reason}],
                "usage": self._usage()}  # fmt: skip

    async def events(self, pieces: AsyncIterator[str], usage: bool) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of text, one with the finish reason, then
        (if asked) one with the usage, then [DONE]."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        try:
            first = True
            async for piece in pieces:
                yield _event({**self._head(kind), "choices": [self._delta(piece, None, first)]})
                first = False
            yield _event({**self._head(kind), "choices": [self._delta("", self.finish_reason, first)]})
            if usage:
                yield _event({**self._head(kind), "choices": [], "usage": self._usage()})
        except ApiError as error:
            yield _event({"error": json.loads(error.response().body)["error"]})
        yield "data: [DONE]\n\n"

    def _delta(self, text: str, finish_reason: str | None, first: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {"index": 0, "delta": delta if text or first else {}, "finish_reason": finish_reason}

    def _head(self, kind: str) -> dict[str, Any]:
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        return head if self.degraded_from is None else {**head, "degraded_from": self.degraded_from}

    def _usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"
