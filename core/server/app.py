"""The OpenAI-compatible HTTP API over an ``AsyncLLMEngine`` (FastAPI).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream as
server-sent events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health``,
``GET /metrics``, ``POST /tokenize``, ``POST /detokenize``, ``GET /version``.

Errors use OpenAI's JSON (``{"error": {"message", "type", "param", "code"}}``): 400 names
the bad field, 401 when ``api_key`` is set and the bearer token is missing or wrong, 404 for
a model this server does not serve, 503 with ``Retry-After`` when too many requests wait or
the server is draining.  Once a stream has started, an error arrives as a ``data: {"error":
...}`` event followed by ``[DONE]``.

Each prompt is one engine request (id ``<id>-<prompt index>``) whose ``n`` (and
``best_of``) sequences the engine forks after the prompt, sharing its KV blocks; choice
``prompt index * n + sequence index``.  A completion's list of prompts is validated and
admitted together or not at all.  When the client goes away its engine requests are
aborted: streaming responses see it as cancellation, non-streaming ones watch for the
disconnect while they wait.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedllm import __version__
from pagedllm.async_engine import (AsyncLLMEngine, EngineOverloadedError, EngineStoppedError,
                                   RequestFailedError, RequestStream)
from pagedllm.outputs import Logprob, RequestOutput
from pagedllm.sampling_params import InvalidRequestError
from pagedllm.server import protocol as P
from pagedllm.server.metrics import CONTENT_TYPE, ServerMetrics

RETRY_AFTER_S = 1
# Keys of chat_template_kwargs a client may not override: the server decides these.
_RESERVED_TEMPLATE_KWARGS = {"conversation", "messages", "tokenize", "return_dict",
                             "add_generation_prompt", "continue_final_message", "chat_template"}


@dataclass
class ServerSettings:
    served_model_names: list[str]
    model_path: str | None = None  # what --model said; accepted as a model name too
    api_key: str | None = None
    shutdown_timeout: float = 30.0  # SIGTERM: how long running requests may go on

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def accepts(self, name: str) -> bool:
        return name in self.served_model_names or name == self.model_path


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 code: str | int | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return P.ErrorResponse(error=P.ErrorInfo(message=self.message, type=self.type,
                                                 param=self.param, code=self.code)).model_dump()


def _bad_request(exc: InvalidRequestError, rename: Mapping[str, str] | None = None) -> APIError:
    param = (rename or {}).get(exc.field, exc.field)
    message = str(exc)
    if param != exc.field:
        message = f"{param}: " + message.removeprefix(f"{exc.field}: ")
    return APIError(400, message, "invalid_request_error", param=param)


def _error_for(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return _bad_request(exc)
    if isinstance(exc, EngineOverloadedError):
        return APIError(503, str(exc), "server_overloaded", code="overloaded",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, EngineStoppedError):
        return APIError(503, str(exc), "service_unavailable", code="shutting_down",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(exc, RequestFailedError):
        return APIError(500, str(exc), "server_error", code="engine_error")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


class ApiKeyMiddleware:
    """401 unless ``Authorization: Bearer <key>``, on the model routes (``/v1/*``,
    ``/tokenize``, ``/detokenize``); ``/health``, ``/metrics`` and ``/version`` stay open
    for probes and scrapers, as in vLLM.  A pure ASGI middleware: it does not wrap
    streaming responses."""

    def __init__(self, app, api_key: str, on_reject=None):
        self.app = app
        self.key = api_key.encode()
        self.on_reject = on_reject

    @staticmethod
    def protected(path: str) -> bool:
        return path.startswith("/v1") or path in ("/tokenize", "/detokenize")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" \
                or not self.protected(scope.get("path", "")):
            return await self.app(scope, receive, send)
        auth = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                auth = value
                break
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        message = ("missing API key: send 'Authorization: Bearer <key>'" if not auth
                   else "invalid API key")
        err = APIError(401, message, "invalid_request_error", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
        if self.on_reject is not None:
            self.on_reject(401)
        response = JSONResponse(err.body(), status_code=401, headers=err.headers)
        await response(scope, receive, send)


# ---- helpers shared by chat and completions --------------------------------------------------
def _clamp(logprob: float) -> float:
    return max(logprob, P.LOGPROB_FLOOR)


def _token_text(tokenizer, token_id: int, entry: Logprob | None) -> str:
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    if tokenizer is not None:
        return tokenizer.decode([token_id])
    return str(token_id)


def _holdback(params_stop: list[str], include_stop: bool) -> int:
    """Characters a stream must hold back: a stop string the engine has not seen whole yet
    may still cut them off the text."""
    if params_stop and not include_stop:
        return max(len(s) for s in params_stop) - 1
    return 0


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, None, exc))
            return
        queue.put_nowait((i, None, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, out, exc = await queue.get()
            if exc is not None:
                raise exc
            if out is None:
                remaining -= 1
                continue
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.abort()


async def _wait_for_disconnect(request: Request) -> None:
    """Returns when the client has gone away (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(streams: list[RequestStream], request: Request) -> list[RequestOutput]:
    """Final outputs of every stream; aborts them all if the client disconnects first."""
    async def last(stream: RequestStream) -> RequestOutput:
        final = None
        async for out in stream:
            final = out
        assert final is not None
        return final

    tasks = [asyncio.ensure_future(last(s)) for s in streams]
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        pending = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending | {watcher},
                                               return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                raise ClientDisconnected()
            pending.discard(watcher)
            for t in done:
                if t.exception() is not None:
                    raise t.exception()
        return [t.result() for t in tasks]
    finally:
        watcher.cancel()
        for t in tasks:
            t.cancel()
        for s in streams:
            s.abort()


class ClientDisconnected(Exception):
    """The client went away before its (non-streaming) response was ready."""


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}


def _param_path(loc) -> str:
    """``('body', 'messages', 0, 'role')`` -> ``messages[0].role``; pydantic's union-member
    tags (``'list[int]'``, ``'str'``) are dropped."""
    path = ""
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part or part.startswith(("function-", "constrained-")):
            continue
        else:
            path += f".{part}" if path else part
    return path


def _sse(payload: Any) -> str:
    if isinstance(payload, P.OpenAIBaseModel):
        payload = payload.model_dump_json()
    elif not isinstance(payload, str):
        payload = json.dumps(payload)
    return f"data: {payload}\n\n"


SSE_DONE = "data: [DONE]\n\n"


@dataclass
class _Choice:
    """Streaming progress of one choice."""

    sent_text: int = 0
    sent_tokens: int = 0
    text_offset: int = 0
    started: bool = False
    done: bool = False


# ---- the app ---------------------------------------------------------------------------------
def build_app(engine: AsyncLLMEngine, settings: ServerSettings,
              metrics: ServerMetrics | None = None) -> FastAPI:
    """The FastAPI app.  Its lifespan starts the engine thread and stops it on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="pagedllm", version=__version__, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = metrics
    tokenizer = engine.tokenizer
    # Without a tokenizer there is no text: stream a (textless) chunk per step anyway, so
    # clients still see tokens arrive (time to first token, inter-token latency).
    notext = tokenizer is None

    def count_error(status: int) -> None:
        if metrics is not None:
            metrics.on_http_error(status)

    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key, on_reject=count_error)

    def error_response(err: APIError) -> JSONResponse:
        count_error(err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(InvalidRequestError)
    async def _invalid(_request, exc: InvalidRequestError):
        return error_response(_bad_request(exc))

    @app.exception_handler(EngineOverloadedError)
    @app.exception_handler(EngineStoppedError)
    @app.exception_handler(RequestFailedError)
    async def _engine_error(_request, exc: Exception):
        return error_response(_error_for(exc))

    @app.exception_handler(ClientDisconnected)
    async def _gone(_request, _exc):
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        param = _param_path(first.get("loc", ())) or "body"
        return error_response(APIError(400, f"{param}: {first.get('msg')}",
                                       "invalid_request_error", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code,
                                                                           "invalid_request_error")
        return error_response(APIError(exc.status_code, str(exc.detail), kind,
                                       headers=getattr(exc, "headers", None)))

    def check_model(name: str | None) -> str:
        if name is None or name == "":
            return settings.model_name
        if not settings.accepts(name):
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                                f"{', '.join(repr(n) for n in settings.served_model_names)}",
                           "invalid_request_error", param="model", code="model_not_found")
        return name

    # ---- small endpoints ----------------------------------------------------------------
    @app.get("/health")
    async def health():
        if engine.dead_error is not None:
            raise APIError(503, f"the engine has stopped: {engine.dead_error!r}",
                           "service_unavailable")
        if not engine.accepting:
            raise APIError(503, "the server is shutting down", "service_unavailable",
                           headers={"Retry-After": str(RETRY_AFTER_S)})
        return Response(status_code=200)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    @app.get("/v1/models")
    async def models():
        cards = [P.ModelCard(id=name, root=settings.model_path, max_model_len=engine.max_model_len)
                 for name in settings.served_model_names]
        return P.ModelList(data=cards).model_dump()

    @app.get("/metrics")
    async def prometheus():
        if metrics is None:
            raise APIError(404, "metrics are disabled", "not_found_error")
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def require_tokenizer(field_name: str):
        if tokenizer is None:
            raise APIError(400, f"{field_name}: this model has no tokenizer",
                           "invalid_request_error", param=field_name)
        return tokenizer

    def chat_token_ids(messages: list[dict], add_generation_prompt: bool,
                       continue_final_message: bool = False,
                       template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
        tok = require_tokenizer("messages")
        if not getattr(tok, "chat_template", None):
            raise InvalidRequestError("messages", "this model's tokenizer has no chat template "
                                                  "(not an instruct model?); use /v1/completions")
        kwargs = {k: v for k, v in (template_kwargs or {}).items()
                  if k not in _RESERVED_TEMPLATE_KWARGS}
        try:
            encoded = tok.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tokenize=True, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the template's own complaint, as a 400
            raise InvalidRequestError("messages", f"the chat template rejected them: {exc}") from exc
        if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
            encoded = encoded["input_ids"]
        return list(encoded)

    @app.post("/tokenize")
    async def tokenize(body: P.TokenizeRequest):
        check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "prompt: give exactly one of prompt and messages",
                           "invalid_request_error", param="prompt")
        if body.messages is not None:
            conv = P.ChatCompletionRequest(messages=body.messages).conversation()
            ids = chat_token_ids(conv, body.add_generation_prompt)
        else:
            tok = require_tokenizer("prompt")
            ids = list(tok.encode(body.prompt, add_special_tokens=body.add_special_tokens))
        return P.TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len,
                                  tokens=ids).model_dump()

    @app.post("/detokenize")
    async def detokenize(body: P.DetokenizeRequest):
        check_model(body.model)
        tok = require_tokenizer("tokens")
        vocab = engine.engine.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens: token id {bad[0]} is outside [0, {vocab})",
                           "invalid_request_error", param="tokens")
        return P.DetokenizeResponse(prompt=tok.decode(body.tokens)).model_dump()

    # ---- generation ---------------------------------------------------------------------
    def start(request_id: str, prompts: list, body: P.SamplingRequest, max_tokens: int | None,
              logprobs: int | None, rename: Mapping[str, str]) -> list[RequestStream]:
        try:
            params = body.sampling_params(max_tokens, logprobs)
            return engine.add_requests([(f"{request_id}-{i}", prompt, params, body.priority)
                                        for i, prompt in enumerate(prompts)])
        except InvalidRequestError as exc:
            err = _bad_request(exc, rename)
            if len(prompts) > 1 and hasattr(exc, "index"):
                err.message = f"{err.message} (prompt {exc.index})"
            raise err from None

    @app.post("/v1/completions")
    async def completions(body: P.CompletionRequest, raw: Request):
        model = check_model(body.model)
        try:
            body.check()
            prompts = body.prompts()
        except InvalidRequestError as exc:
            raise _bad_request(exc) from None
        request_id = f"cmpl-{uuid.uuid4().hex}"
        streams = start(request_id, prompts, body, body.max_tokens, body.logprobs, {})
        created = int(time.time())
        echo = [_prompt_text(p) for p in prompts] if body.echo else None
        if body.stream:
            return StreamingResponse(
                _completion_events(request_id, model, created, body, streams, echo),
                media_type="text/event-stream")
        outputs = await _collect_or_raise(streams, raw)
        choices = []
        for i, out in enumerate(outputs):
            for c in out.outputs:
                text = c.text if echo is None else echo[i] + c.text
                lp = None
                if body.logprobs is not None and c.logprobs is not None:
                    lp = _completion_logprobs(c.token_ids, c.logprobs, body.logprobs, 0)[0]
                choices.append(P.CompletionChoice(index=i * body.n + c.index, text=text,
                                                  logprobs=lp, finish_reason=c.finish_reason,
                                                  stop_reason=c.stop_reason))
        return P.CompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                    usage=_usage(dict(enumerate(outputs)))).model_dump()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, raw: Request):
        model = check_model(body.model)
        rename = {"max_tokens": body.max_tokens_field}
        try:
            body.check()
            if body.chat_template is not None:
                raise InvalidRequestError("chat_template", "per-request chat templates are not "
                                                           "accepted; the model's own is used")
            ids = chat_token_ids(body.conversation(), body.add_generation_prompt,
                                 body.continue_final_message, body.chat_template_kwargs)
        except InvalidRequestError as exc:
            raise _bad_request(exc, rename) from None
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = start(request_id, [{"prompt_token_ids": ids}], body,
                        body.effective_max_tokens, body.num_logprobs, rename)
        created = int(time.time())
        if body.stream:
            return StreamingResponse(_chat_events(request_id, model, created, body, streams),
                                     media_type="text/event-stream")
        outputs = await _collect_or_raise(streams, raw)
        choices = []
        for c in outputs[0].outputs:
            lp = None
            if body.logprobs and c.logprobs is not None:
                lp = P.ChatLogprobs(content=_chat_logprobs(c.token_ids, c.logprobs,
                                                           body.top_logprobs or 0))
            choices.append(P.ChatChoice(index=c.index,
                                        message=P.ChatResponseMessage(content=c.text),
                                        logprobs=lp, finish_reason=c.finish_reason,
                                        stop_reason=c.stop_reason))
        return P.ChatCompletionResponse(
            id=request_id, created=created, model=model, choices=choices,
            usage=_usage({0: outputs[0]})).model_dump()

    # ---- response pieces ----------------------------------------------------------------
    def _prompt_text(prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        ids = prompt["prompt_token_ids"]
        return tokenizer.decode(ids) if tokenizer is not None else ""

    def _completion_logprobs(token_ids, logprobs, k: int, offset: int):
        out = P.CompletionLogprobs()
        for tid, entry in zip(token_ids, logprobs):
            sampled = entry.get(tid)
            text = _token_text(tokenizer, tid, sampled)
            out.tokens.append(text)
            out.token_logprobs.append(_clamp(sampled.logprob) if sampled is not None else None)
            out.top_logprobs.append({
                _token_text(tokenizer, t, lp): _clamp(lp.logprob)
                for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank)
                if lp.rank <= k or t == tid})
            out.text_offset.append(offset)
            offset += len(text)
        return out, offset

    def _chat_logprobs(token_ids, logprobs, k: int) -> list[P.ChatLogprobToken]:
        content = []
        for tid, entry in zip(token_ids, logprobs):
            sampled = entry.get(tid)
            text = _token_text(tokenizer, tid, sampled)
            top = [P.TopLogprob(token=(s := _token_text(tokenizer, t, lp)),
                                logprob=_clamp(lp.logprob), bytes=list(s.encode()))
                   for t, lp in sorted(entry.items(), key=lambda kv: kv[1].rank)
                   if lp.rank <= k][:k]
            content.append(P.ChatLogprobToken(
                token=text, logprob=_clamp(sampled.logprob) if sampled else P.LOGPROB_FLOOR,
                bytes=list(text.encode()), top_logprobs=top))
        return content

    async def _collect_or_raise(streams, raw) -> list[RequestOutput]:
        try:
            return await _collect(streams, raw)
        except (RequestFailedError, EngineStoppedError) as exc:
            raise _error_for(exc) from None

    def _usage(outputs: dict[int, RequestOutput]) -> P.UsageInfo:
        """Usage of the latest output of each prompt (one engine request per prompt)."""
        prompt = sum(len(o.prompt_token_ids) for o in outputs.values())
        completion = sum(len(c.token_ids) for o in outputs.values() for c in o.outputs)
        return P.UsageInfo.of(prompt, completion)

    def _advance(state: _Choice, c, finished: bool, holdback: int) -> tuple[str, int, int]:
        """The text of completion ``c`` to send now and the token range it covers."""
        finished = finished or c.finish_reason is not None
        end = len(c.text) if finished else max(state.sent_text, len(c.text) - holdback)
        delta = c.text[state.sent_text:end]
        state.sent_text = max(state.sent_text, end)
        first, last = state.sent_tokens, len(c.token_ids)
        state.sent_tokens = last
        return delta, first, last

    async def _events(streams, make_chunks, usage_chunk):
        """The SSE body: chunks as outputs arrive, the usage chunk, ``[DONE]``; on any
        exit (end, error, client gone) every engine request is aborted."""
        latest: dict[int, RequestOutput] = {}
        try:
            for chunk in make_chunks(None, None, latest):
                yield _sse(chunk)
            async for index, out in _merge(streams):
                latest[index] = out
                for chunk in make_chunks(index, out, latest):
                    yield _sse(chunk)
            final = usage_chunk(latest)
            if final is not None:
                yield _sse(final)
        except (RequestFailedError, EngineStoppedError) as exc:
            err = _error_for(exc)
            count_error(err.status)
            yield _sse(err.body())
        finally:
            for s in streams:
                s.abort()
        yield SSE_DONE

    def _completion_events(request_id, model, created, body: P.CompletionRequest, streams,
                           echo: list[str] | None):
        n = body.n
        states: dict[int, _Choice] = {}
        holdback = _holdback(body.stop_strings, body.include_stop_str_in_output)

        def chunks(prompt_index, out, latest):
            if out is None:
                return
            for c in out.outputs:
                index = prompt_index * n + c.index
                state = states.setdefault(index, _Choice())
                if state.done:
                    continue
                delta, first, last = _advance(state, c, out.finished, holdback)
                done = out.finished or c.finish_reason is not None
                if not state.started and echo is not None:
                    delta = echo[prompt_index] + delta
                state.started = True
                lp = None
                if body.logprobs is not None and c.logprobs is not None and last > first:
                    lp, state.text_offset = _completion_logprobs(
                        c.token_ids[first:last], c.logprobs[first:last], body.logprobs,
                        state.text_offset)
                if not delta and lp is None and not done and not (notext and last > first):
                    continue
                state.done = done
                yield P.CompletionChunk(
                    id=request_id, created=created, model=model,
                    choices=[P.CompletionChoice(index=index, text=delta, logprobs=lp,
                                                finish_reason=c.finish_reason if done else None,
                                                stop_reason=c.stop_reason if done else None)],
                    usage=_usage(latest) if body.continuous_usage else None)

        def usage_chunk(latest):
            if not body.include_usage:
                return None
            return P.CompletionChunk(id=request_id, created=created, model=model, choices=[],
                                     usage=_usage(latest))

        return _events(streams, chunks, usage_chunk)

    def _chat_events(request_id, model, created, body: P.ChatCompletionRequest, streams):
        states: dict[int, _Choice] = {}
        holdback = _holdback(body.stop_strings, body.include_stop_str_in_output)

        def chunk(choice: P.ChatChunkChoice, latest) -> P.ChatCompletionChunk:
            return P.ChatCompletionChunk(
                id=request_id, created=created, model=model, choices=[choice],
                usage=_usage(latest) if body.continuous_usage and latest else None)

        def chunks(_prompt_index, out, latest):
            if out is None:  # the opening: every choice's role, before any token exists
                for i in range(body.n):
                    yield chunk(P.ChatChunkChoice(index=i, delta=P.ChatDelta(
                        role="assistant", content="")), latest)
                return
            for c in out.outputs:
                state = states.setdefault(c.index, _Choice())
                if state.done:
                    continue
                delta, first, last = _advance(state, c, out.finished, holdback)
                done = out.finished or c.finish_reason is not None
                lp = None
                if body.logprobs and c.logprobs is not None and last > first:
                    lp = P.ChatLogprobs(content=_chat_logprobs(
                        c.token_ids[first:last], c.logprobs[first:last], body.top_logprobs or 0))
                if not delta and lp is None and not done and not (notext and last > first):
                    continue
                state.done = done
                yield chunk(P.ChatChunkChoice(
                    index=c.index, delta=P.ChatDelta(content=delta if delta else None),
                    logprobs=lp, finish_reason=c.finish_reason if done else None,
                    stop_reason=c.stop_reason if done else None), latest)

        def usage_chunk(latest):
            if not body.include_usage:
                return None
            return P.ChatCompletionChunk(id=request_id, created=created, model=model,
                                         choices=[], usage=_usage(latest))

        return _events(streams, chunks, usage_chunk)

    return app
