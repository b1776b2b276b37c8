"""`tailor serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the shared generation engine.

    GET  /v1/models             the one model this server holds
    POST /v1/chat/completions   rendered with the run's chat format (the training prompt gives training ids)
    POST /v1/completions        raw text (or token ids) continued as is

Both POST routes stream with `stream: true` (server-sent events in OpenAI's chunk format, ending with
`data: [DONE]`). Every error is a JSON body in OpenAI's shape, {"error": {"message", "type", "param", "code"}},
so the official clients raise their usual exception classes with the message.
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Callable

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from tailorlm.serve.engine import Engine, PromptError, TextStream
from tailorlm.serve.protocol import (ChatRequest, ChunkWriter, CompletionRequest, SamplingRequest, chat_reply,
                                     describe_validation, error_body, text_reply)


class UnknownModel(Exception):
    pass


def create_app(engine: Engine, model_id: str) -> FastAPI:
    app = FastAPI(title=f"tailor serve: {model_id}", docs_url=None, redoc_url=None)
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_, exc: RequestValidationError):
        message, param = describe_validation(exc.errors())
        return JSONResponse(error_body(message, param), status_code=400)

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
    async def chat_completions(request: ChatRequest):
        check_model(request.model)
        return await _respond(engine, request, lambda: engine.chat_prompt(request.turns()), model_id, chat=True)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        check_model(request.model)
        prompt = request.prompt  # token ids as given, or text tokenized as is

        def render() -> list[int]:
            return prompt if isinstance(prompt, list) else engine.text_prompt(prompt)

        return await _respond(engine, request, render, model_id, chat=False)

    return app


async def _respond(engine: Engine, request: SamplingRequest, render: Callable[[], list[int]], model_id: str,
                   chat: bool):
    try:
        prompt, sampling = render(), request.sampling()
        if not request.stream:
            # The engine's worker thread fills the future; awaiting it keeps the event loop free for other clients.
            completion = await asyncio.wrap_future(engine.submit(prompt, sampling))
            return (chat_reply if chat else text_reply)(completion, model_id)
        stream = engine.stream(prompt, sampling)  # a prompt over the context fails here, before any byte is sent
    except PromptError:
        raise
    except Exception as e:
        # Answered here rather than by an app-wide handler, which Starlette re-raises and the connection dies with.
        return JSONResponse(error_body(f"{type(e).__name__}: {e}", kind="server_error"), status_code=500)
    return StreamingResponse(_events(stream, ChunkWriter(chat, model_id), request.include_usage),
                             media_type="text/event-stream")


async def _events(stream: TextStream, writer: ChunkWriter, include_usage: bool):
    pieces, end = iter(stream), object()
    try:
        if (opening := writer.start()) is not None:
            yield opening
        # Each piece is waited for in a worker thread; the event loop keeps serving the other clients.
        while (piece := await run_in_threadpool(next, pieces, end)) is not end:
            if piece:  # the streamer also hands over empty strings (at the end, after special tokens)
                yield writer.text(piece)
        yield writer.text("", stream.completion.finish_reason)
        if include_usage:
            yield writer.usage(stream.completion)
    except Exception as e:  # the status line is already sent: report the failure in the stream, as OpenAI does
        import json

        yield f"data: {json.dumps(error_body(str(e) or type(e).__name__, kind='server_error'))}\n\n"
    finally:
        stream.cancel()  # a client that went away stops its generation instead of holding the model
    yield writer.done()


def serve(engine: Engine, model_id: str, host: str, port: int) -> None:
    import uvicorn

    try:
        uvicorn.run(create_app(engine, model_id), host=host, port=port, log_level="info")
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
