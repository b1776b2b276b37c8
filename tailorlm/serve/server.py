"""`tailor serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the shared generation engine.

    GET  /v1/models             the one model this server holds
    POST /v1/chat/completions   rendered with the run's chat format (the training prompt gives training ids)
    POST /v1/completions        raw text (or token ids) continued as is

Both POST routes stream with `stream: true` (server-sent events in OpenAI's chunk format, ending with
`data: [DONE]`). Every error is a JSON body in OpenAI's shape, {"error": {"message", "type", "param", "code"}},
so the official clients raise their usual exception classes with the message.

Limits keep one client from holding the model: a max_tokens over `Limits.max_tokens` is a 400; a request the
model has not taken within `Limits.queue_timeout` seconds is a 503 with Retry-After; and a request whose
client disconnects is cancelled, whether it is queued, generating, or streaming (each such cancel is logged to
"tailorlm.serve", which `serve` prints beside uvicorn's log). Which OpenAI parameters are honoured, refused or
ignored is protocol.py's docstring; an engine that cannot honour one (Engine.unsupported) refuses it by name.
"""
from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import socket
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from tailorlm.serve.engine import Engine, Job, PromptError, TextStream
from tailorlm.serve.protocol import (ChatRequest, ChunkWriter, CompletionRequest, ParameterError, SamplingRequest,
                                     chat_reply, describe_validation, error_body, text_reply)

DISCONNECT_POLL_S = 0.1  # how often a request waiting on the model checks that its client is still there
CLIENT_CLOSED = 499  # nginx's status for a request whose client left; nobody reads it, but access logs show it

log = logging.getLogger("tailorlm.serve")


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 2048  # the largest max_tokens (or max_completion_tokens) a request may ask for
    queue_timeout: float = 60.0  # seconds a request may wait for the model to take it


class UnknownModel(Exception):
    pass


class ClientGone(Exception):
    pass


def create_app(engine: Engine, model_id: str, limits: Limits = Limits()) -> FastAPI:
    app = FastAPI(title=f"tailor serve: {model_id}", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, exc: RequestValidationError):
        message, param = describe_validation(exc.errors())
        return JSONResponse(error_body(message, param), status_code=400)

    @app.exception_handler(ParameterError)
    async def over_a_limit(_, exc: ParameterError):
        return JSONResponse(error_body(str(exc), exc.param), status_code=400)

    @app.exception_handler(PromptError)
    async def bad_prompt(request, exc: PromptError):
        param = "messages" if request.url.path.endswith("/chat/completions") else "prompt"
        return JSONResponse(error_body(str(exc), param, exc.code), status_code=400)

    @app.exception_handler(UnknownModel)
    async def unknown_model(_, exc: UnknownModel):
        message = f"The model '{exc}' does not exist; this server serves '{model_id}'"
        return JSONResponse(error_body(message, "model", "model_not_found"), status_code=404)

    @app.exception_handler(HTTPException)
    async def http_error(_, exc: HTTPException):  # unknown routes, wrong methods: same shape as the rest
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code)

    def check_model(name: str) -> None:
        if name != model_id:
            raise UnknownModel(name)

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "tailorlm"}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, http: Request):
        check_model(request.model)
        return await _respond(engine, limits, request, http, lambda: engine.chat_prompt(request.turns()), model_id,
                              chat=True)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request):
        check_model(request.model)
        prompt = request.prompt  # token ids as given, or text tokenized as is

        def render() -> list[int]:
            return prompt if isinstance(prompt, list) else engine.text_prompt(prompt)

        return await _respond(engine, limits, request, http, render, model_id, chat=False)

    return app


async def _respond(engine: Engine, limits: Limits, request: SamplingRequest, http: Request,
                   render: Callable[[], list[int]], model_id: str, chat: bool):
    sampling = request.sampling(limits.max_tokens)  # before rendering: a max_tokens over the limit is a 400 now
    for param, asked in (("logprobs", sampling.logprobs is not None), ("response_format", sampling.json_format)):
        if asked and param in engine.unsupported:
            raise ParameterError(engine.unsupported[param], param)
    try:
        job = engine.add(render(), sampling, streamed=request.stream)  # a prompt over the context fails here
        if not await _taken(engine, job, http, limits.queue_timeout):
            seconds = max(1, math.ceil(limits.queue_timeout))
            message = (f"the server is busy: the request waited {limits.queue_timeout:g} s without reaching the "
                       f"model; retry in {seconds} s")
            # The request already waited this long, so the queue ahead of it is at least this deep.
            return JSONResponse(error_body(message, code="queue_timeout", kind="server_error"), status_code=503,
                                headers={"Retry-After": str(seconds)})
        if not request.stream:
            completion = await _watch(job.future, http)
            return (chat_reply if chat else text_reply)(completion, model_id)
    except ClientGone:
        queued = engine.cancel(job)
        log.info("client left: %s request cancelled %s", http.url.path,
                 "before it reached the model" if queued else "while the model generated its answer")
        return Response(status_code=CLIENT_CLOSED)
    except PromptError:
        raise
    except Exception as e:
        # Answered here rather than by an app-wide handler, which Starlette re-raises and the connection dies with.
        return JSONResponse(error_body(f"{type(e).__name__}: {e}", kind="server_error"), status_code=500)
    return _StreamedReply(engine, job, _events(TextStream(job), ChunkWriter(chat, model_id), request.include_usage),
                          http.url.path)


async def _taken(engine: Engine, job: Job, http: Request, timeout: float) -> bool:
    """Wait until the model takes the job; False when it waited past timeout (then it is out of the queue)."""
    try:
        await _watch(job.started, http, timeout)
    except TimeoutError:
        if engine.withdraw(job):
            return False
    return True  # withdraw() found it already started: the model took it just as the time ran out


async def _watch(future: Future, http: Request, timeout: float | None = None):
    """The future's result, checking every DISCONNECT_POLL_S that the client is still connected.

    Raises ClientGone when it has left, TimeoutError after timeout seconds; either way the work goes on until
    the caller stops it."""
    waiter = asyncio.wrap_future(future)
    waiter.add_done_callback(lambda w: w.cancelled() or w.exception())  # read, even when no one awaits it any more
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = DISCONNECT_POLL_S if deadline is None else min(DISCONNECT_POLL_S, deadline - time.monotonic())
        done, _ = await asyncio.wait({waiter}, timeout=max(left, 0))
        if done:
            return waiter.result()
        if await http.is_disconnected():
            raise ClientGone
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError


class _StreamedReply(StreamingResponse):
    """Server-sent events that cancel their job however the response ends: a client that disconnects, even
    before the first event, frees the model at the next decode step (a finished job ignores the cancel)."""

    def __init__(self, engine: Engine, job: Job, events, path: str):
        super().__init__(events, media_type="text/event-stream")
        self.engine, self.job, self.path = engine, job, path

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.future.done():  # a stream read to its end has its answer: only a client that left
                log.info("client left: streamed %s request cancelled mid-answer", self.path)
            self.engine.cancel(self.job)


async def _events(stream: TextStream, writer: ChunkWriter, include_usage: bool):
    pieces, end = iter(stream), object()
    try:
        if (opening := writer.start()) is not None:
            yield opening
        # Each piece is waited for in a worker thread, so the event loop keeps serving the other clients. When the
        # client disconnects, Starlette cancels this generator at once (abandon_on_cancel: the thread returns by
        # itself once the cancelled generation ends its stream).
        while (piece := await to_thread.run_sync(next, pieces, end, abandon_on_cancel=True)) is not end:
            if piece:  # the streamer also hands over empty strings (at the end, after special tokens)
                yield writer.text(piece)
        yield writer.text("", stream.completion.finish_reason)
        if include_usage:
            yield writer.usage(stream.completion)
    except Exception as e:  # the status line is already sent: report the failure in the stream, as OpenAI does
        yield f"data: {json.dumps(error_body(str(e) or type(e).__name__, kind='server_error'))}\n\n"
    yield writer.done()


def serve(engine: Engine, model_id: str, host: str, port: int, limits: Limits = Limits()) -> None:
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    # uvicorn's own log setup, plus this package's logger on the same handler: cancelled requests and worker
    # faults show in the server's log as uvicorn's lines do.
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["tailorlm.serve"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    try:
        uvicorn.run(create_app(engine, model_id, limits), host=host, port=port, log_level="info",
                    log_config=log_config)
    finally:
        engine.close()


class BackgroundServer:
    """uvicorn serving an app from a thread, on a free port the OS picks (tests and benchmarks)."""

    def __init__(self, app, host: str = "127.0.0.1"):
        import uvicorn

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind((host, 0))  # bound before uvicorn starts: no race for the port
        self.host, self.port = host, self._socket.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *_) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()
