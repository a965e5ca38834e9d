"""The ASGI app: OpenAI's routes over an EngineLoop (completions, chat, models, health, metrics), API-key and
body-size checks, and every error in OpenAI's shape."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from tierkv.errors import CapacityError, ConfigError, TierKVError
from tierkv.inputs import chat_token_ids
from tierkv.serve.engine_loop import EngineLoop, QueueFull
from tierkv.serve.metrics import Metrics
from tierkv.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    OpenAIError,
    chat_logprobs,
    completion_logprobs,
    echo_of,
    joined,
    now,
    stable_text,
    usage,
    vllm_prompt_logprobs,
)


def _status_of(exc: Exception) -> OpenAIError:
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, QueueFull):
        return OpenAIError(503, str(exc), code="overloaded")
    if isinstance(exc, (ConfigError, CapacityError)):
        return OpenAIError(400, str(exc))
    if isinstance(exc, TierKVError):
        return OpenAIError(500, str(exc))
    return OpenAIError(500, f"{type(exc).__name__}: {exc}")


async def _merged(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """(index, item) from several async iterators as they come; closing it closes them all (each aborts its request)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, it):
        try:
            async for item in it:
                await queue.put((i, item))
        except BaseException as exc:  # noqa: BLE001 - handed over to the consumer
            await queue.put((i, exc))
        finally:
            await queue.put((i, done))

    tasks = [asyncio.create_task(pump(i, it)) for i, it in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for it in streams:
            with contextlib.suppress(BaseException):
                await it.aclose()


class BodyLimit:
    """ASGI middleware: a request body is counted as it arrives (a chunked one has no Content-Length to check
    first) and refused past `limit` bytes, as an HTTPException(413) that the app answers in OpenAI's shape.
    (FastAPI's own max_body_size answers in plain text, which OpenAI clients cannot read.)"""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        size = dict(scope.get("headers", [])).get(b"content-length")
        if size is not None and size.isdigit() and int(size) > self.limit:
            body = OpenAIError(413, f"the request body is {int(size)} bytes; the limit is {self.limit}").body()
            return await JSONResponse(body, status_code=413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise StarletteHTTPException(413, f"the request body is over the limit of {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def build_app(
    engine: EngineLoop,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = 8 << 20,
    on_shutdown=None,
) -> FastAPI:
    """The app serving `engine` as `model_name`; `on_shutdown()` runs when the server stops (after its drain)."""

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        if on_shutdown is not None:
            await asyncio.to_thread(on_shutdown)

    app = FastAPI(title="tierkv", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    metrics = Metrics(lambda: engine.call(lambda llm: llm.stats()).result(timeout=30))

    def error(exc: OpenAIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(OpenAIError)
    async def _openai_error(_, exc: OpenAIError):
        return error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, exc: StarletteHTTPException):
        message = (
            f"the request body is over the limit of {max_body_bytes} bytes" if exc.status_code == 413 else exc.detail
        )
        return error(OpenAIError(exc.status_code, str(message)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error(OpenAIError(400, f"{param or 'body'}: {first.get('msg', 'invalid request')}", param=param))

    @app.middleware("http")
    async def _gate(request: Request, call_next):
        if request.url.path.startswith("/v1/"):
            if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
                return error(OpenAIError(401, "a missing or wrong API key: send Authorization: Bearer <key>"))
        return await call_next(request)

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise OpenAIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}", "model")

    async def start(prompts, params, kind: str, priority: int = 0) -> tuple[list[AsyncIterator], list]:
        """One engine request per prompt; each first output awaited, so that a bad request fails before a byte of
        the response is sent (and the ones already started are aborted)."""
        streams, firsts = [], []
        try:
            for prompt in prompts:
                it = engine.generate(engine.new_id(kind), prompt, params, priority).__aiter__()
                streams.append(it)
                firsts.append(await it.__anext__())
        except BaseException as exc:
            for it in streams:
                await it.aclose()
            if isinstance(exc, Exception):
                raise _status_of(exc) from None
            raise
        return streams, firsts

    async def finish_all(request: Request, streams, firsts) -> list:
        """Every request to its end; a client that disconnects meanwhile aborts them all."""
        outs = list(firsts)
        live = [k for k, f in enumerate(firsts) if not f.finished]

        async def run():
            async for i, out in _merged([streams[k] for k in live]):
                outs[live[i]] = out

        task = asyncio.create_task(run())
        while not task.done():
            await asyncio.wait({task}, timeout=0.1)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                for s in streams:
                    await s.aclose()
                return []
        task.result()
        for out in outs:
            metrics.observe(out)
        return outs

    def sse(obj) -> bytes:
        return f"data: {json.dumps(obj)}\n\n".encode()

    async def stream_choices(streams, firsts, params, make_chunk, include_usage: bool) -> AsyncIterator[bytes]:
        """Server-sent events: each sample's new text as it becomes stable, its finish reason, then usage, [DONE]."""
        n = params.n
        hold = max((len(s) for s in params.stop_list), default=1) - 1
        sent: dict[int, str] = {}
        sent_tokens: dict[int, int] = {}  # per sample: tokens whose log-probs went out (with the text or before it)
        ended: set[int] = set()
        latest = list(firsts)
        started: set[int] = set()

        def chunks(p: int, out):
            for c in out.outputs[:n]:  # (a beam search has beam_width outputs: the best n are answered)
                index = p * n + c.index
                if index in ended:
                    continue
                text = stable_text(c.text, c.finished, hold)
                before = sent.get(index, "")
                delta = text[len(before) :] if text.startswith(before) else ""
                first = index not in started
                if delta or c.finished or first:
                    started.add(index)
                    sent[index] = before + delta
                    tokens_from = sent_tokens.get(index, 0)
                    sent_tokens[index] = len(c.token_ids)
                    if c.finished:
                        ended.add(index)
                    reason = c.finish_reason if c.finished else None
                    yield sse(make_chunk(index, delta, reason, first, c, tokens_from))

        try:
            for p, out in enumerate(firsts):
                for chunk in chunks(p, out):
                    yield chunk
            live = [k for k, f in enumerate(firsts) if not f.finished]
            try:
                async for i, out in _merged([streams[k] for k in live]):
                    latest[live[i]] = out
                    for chunk in chunks(live[i], out):
                        yield chunk
            except Exception as exc:  # noqa: BLE001 - the headers are sent: the error goes as an event, as vLLM's
                yield sse(_status_of(exc).body())
                yield b"data: [DONE]\n\n"
                return
            for out in latest:
                metrics.observe(out)
            if include_usage:
                yield sse(make_chunk(None, None, None, False, None, 0) | {"choices": [], "usage": usage(latest)})
            yield b"data: [DONE]\n\n"
        finally:
            for s in streams:
                with contextlib.suppress(BaseException):
                    await s.aclose()

    async def respond(body, request: Request, streams, firsts, params, chunk, whole):
        """The stream (server-sent events built by `chunk`) or, once every request has finished, `whole(outputs)`;
        a client gone before then gets nothing (499)."""
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                stream_choices(streams, firsts, params, chunk, include), media_type="text/event-stream"
            )
        outs = await finish_all(request, streams, firsts)
        return whole(outs) if outs else Response(status_code=499)

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": now(), "owned_by": "tierkv"}],
        }

    @app.get("/metrics")
    def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        params = body.sampling(body.max_tokens, body.logprobs)
        if body.echo and body.logprobs is not None and params.prompt_logprobs is None:
            params = replace(params, prompt_logprobs=body.logprobs)  # echoed tokens come with their log-probs
        prompts = [{"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p} for p in body.prompts()]
        beam = body.beam(body.max_tokens, body.logprobs is not None)  # (`params` shapes the answer: n per prompt)
        streams, firsts = await start(prompts, beam or params, "cmpl", body.priority)
        rid, created = f"cmpl-{firsts[0].request_id}", now()
        echoes = None
        if body.echo:  # decoded on the engine's thread (see chat below)
            with_lp = body.logprobs is not None
            echoes = await asyncio.wrap_future(
                engine.call(lambda llm: [echo_of(o, llm.loaded.tokenizer, with_lp) for o in firsts])
            )
        extra_prompt_logprobs = body.prompt_logprobs is not None

        def chunk(index, delta, reason, first, c, tokens_from):
            base = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
            if index is None:
                return base
            echo = echoes[index // params.n] if echoes is not None and first else None
            lp = completion_logprobs(c) if c is not None and c.logprobs is not None else None
            if lp is not None:  # the entries of the tokens not sent before
                lp = {key: v[tokens_from:] for key, v in lp.items()}
                if echo is not None:
                    lp["text_offset"] = [o + len(echo.text) for o in lp["text_offset"]]
            if echo is not None:
                delta, lp = echo.text + delta, joined(echo.logprobs, lp)
            return base | {"choices": [{"index": index, "text": delta, "logprobs": lp, "finish_reason": reason}]}

        def whole(outs) -> dict:
            choices = []
            for p, out in enumerate(outs):
                echo = echoes[p] if echoes is not None else None
                for c in out.outputs[: params.n]:
                    prefix = echo.text if echo is not None else ""
                    choice = {
                        "index": p * params.n + c.index,
                        "text": prefix + c.text,
                        "logprobs": joined(echo and echo.logprobs, completion_logprobs(c, len(prefix))),
                        "finish_reason": c.finish_reason,
                    }
                    if extra_prompt_logprobs:
                        choice["prompt_logprobs"] = vllm_prompt_logprobs(out)
                    choices.append(choice)
            return {"id": rid, "object": "text_completion", "created": created, "model": model_name} | {
                "choices": choices,
                "usage": usage(outs),
            }

        return await respond(body, request, streams, firsts, params, chunk, whole)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model)
        top = body.top_logprobs or 0
        params = body.sampling(body.max_new(), top if body.logprobs else None)
        conversation = [m.as_dict() for m in body.messages]
        # On the engine's thread, between two steps: a fast tokenizer used from two threads at once can fail.
        templated = engine.call(lambda llm: chat_token_ids(llm.loaded.tokenizer, conversation, "messages"))
        try:
            ids = await asyncio.wrap_future(templated)
        except ConfigError as exc:
            raise OpenAIError(400, str(exc), param="messages") from None
        beam = body.beam(body.max_new(), body.logprobs)
        streams, firsts = await start([{"prompt_token_ids": ids}], beam or params, "chatcmpl", body.priority)
        rid, created = f"chatcmpl-{firsts[0].request_id}", now()

        def chunk(index, delta, reason, first, c, tokens_from):
            base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}
            if index is None:
                return base
            message = {"role": "assistant", "content": delta} if first else {"content": delta}
            lp = None
            if c is not None and c.logprobs is not None:  # the entries of the tokens not sent before
                lp = {"content": chat_logprobs(c, top)["content"][tokens_from:]}
            return base | {"choices": [{"index": index, "delta": message, "logprobs": lp, "finish_reason": reason}]}

        def whole(outs) -> dict:
            choices = [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c, top),
                    "finish_reason": c.finish_reason,
                }
                | ({"prompt_logprobs": vllm_prompt_logprobs(outs[0])} if body.prompt_logprobs is not None else {})
                for c in outs[0].outputs[: params.n]
            ]
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name} | {
                "choices": choices,
                "usage": usage(outs),
            }

        return await respond(body, request, streams, firsts, params, chunk, whole)

    return app
