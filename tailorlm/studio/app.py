"""The studio's web server: pages rendered on the server, a JSON API the pages' small script calls.

Safety, in one place:
- Requests must name this machine as their Host (a web page elsewhere cannot rebind a name to 127.0.0.1 and
  read the studio), unless the studio was started with a token, which then guards every request.
- Every request that changes something carries the header X-Studio, which a page of another origin cannot send
  without a CORS preflight this server never answers: no cross-site request can start a run or write a file.
- Every path a request names goes through paths.Folders, which refuses anything outside the allowed folders.
- A malformed request is a 400 naming the field (requests.py); an unexpected error is a JSON 500 whose
  traceback is logged once to the studio's terminal.
"""
from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response,
                               StreamingResponse)
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from tailorlm.errors import TailorError
from tailorlm.serve.jobs import Sampling
from tailorlm.studio import actions, preview, results
from tailorlm.studio.machine import installed_models, machine_facts
from tailorlm.studio.paths import MAX_UPLOAD_BYTES, Refused
from tailorlm.studio.progress import read_progress
from tailorlm.studio.queue import progress_file
from tailorlm.studio.requests import ChatRequest, DraftChange, ExportRequest, StartRequest, describe
from tailorlm.studio.state import Studio

LOCAL_NAMES = {"127.0.0.1", "localhost", "[::1]", "::1"}
logger = logging.getLogger("tailorlm.studio")
TOKEN_COOKIE = "tailor_studio_token"
PAGES = {"data": "Data", "template": "Template", "preflight": "Preflight", "train": "Train", "runs": "Results",
         "compare": "Compare", "chat": "Chat", "export": "Export"}


def unexpected(error: Exception, request: str) -> str:
    """An error no check foresaw: its traceback logged once to the terminal, one line for the page."""
    logger.error("%s failed", request, exc_info=error)
    return f"unexpected {type(error).__name__}: {error} (a tailorlm bug; the studio's terminal has the details)"


def create_app(studio: Studio) -> FastAPI:
    app = FastAPI(title="tailor studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.studio = studio
    pages = Environment(loader=PackageLoader("tailorlm.studio", "templates"), autoescape=select_autoescape())
    app.mount("/static", StaticFiles(directory=Path(__file__).parent / "static"), name="static")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = (request.headers.get("host") or "").rsplit(":", 1)[0]
        if studio.token is None and host not in LOCAL_NAMES:
            return PlainTextResponse(f"tailor studio answers requests for this machine only, not {host!r}", 403)
        set_cookie = False
        if studio.token is not None:
            given = (request.cookies.get(TOKEN_COOKIE) or request.headers.get("x-studio-token")
                     or request.query_params.get("token") or "")
            if not secrets.compare_digest(given.encode(), studio.token.encode()):
                return PlainTextResponse("this studio needs its token: open the address it printed when it started", 401)
            set_cookie = request.query_params.get("token") is not None
        if request.method not in ("GET", "HEAD") and request.headers.get("x-studio") != "1":
            return PlainTextResponse("requests that change something must come from the studio's own pages", 403)
        try:
            response = await call_next(request)
        except Exception as e:  # an error no route foresaw: the page gets JSON it can show
            return JSONResponse({"error": unexpected(e, f"{request.method} {request.url.path}")}, 500)
        if set_cookie:
            response.set_cookie(TOKEN_COOKIE, studio.token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(Refused)
    async def refused(_request, exc: Refused):
        return JSONResponse({"error": str(exc)}, 403)

    @app.exception_handler(TailorError)
    async def failed(_request, exc: TailorError):  # 400, or the class's own status (paths.Missing: 404, ...)
        return JSONResponse({"error": str(exc), **getattr(exc, "details", {})}, getattr(exc, "http_status", 400))

    @app.exception_handler(RequestValidationError)
    async def malformed(_request, exc: RequestValidationError):
        return JSONResponse({"error": describe(exc.errors())}, 400)

    def page(name: str, **extra) -> HTMLResponse:
        return HTMLResponse(pages.get_template(f"{name}.html").render(page=name, pages=PAGES, **extra))

    @app.get("/")
    def home():
        return RedirectResponse("/data")

    @app.get("/favicon.ico")
    def favicon():
        return Response(status_code=204)

    for name in ("data", "template", "preflight", "train", "runs", "compare", "chat", "export"):
        app.add_api_route(f"/{name}", (lambda n: lambda: page(n))(name), methods=["GET"], response_class=HTMLResponse)

    @app.get("/runs/{name:path}")  # GROUP/NAME: a run of a group (a sweep's or auto's trial)
    def run_page(name: str):
        studio.folders.run_dir(name)
        return page("run", run=name)

    # ---------------------------------------------------------------- the draft config
    def state() -> dict:
        error = None
        try:
            studio.draft.config()
        except TailorError as e:
            error = str(e)
        return {"draft": studio.draft.settings, "yaml": studio.draft.yaml(), "error": error,
                "presets": preview.PRESETS, "queue": studio.queue.listing()}

    @app.get("/api/state")
    def get_state():
        return state()

    @app.post("/api/draft")
    def set_draft(change: DraftChange):  # every file the new settings name is checked in Draft.update
        studio.draft.update(change.changes, change.removals)
        return state()

    @app.post("/api/upload")
    async def upload(request: Request, name: str):
        target = studio.folders.upload_path(name)
        size = 0
        try:
            with open(target, "xb") as out:  # x: a fresh file, never one (or a link) already there
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_UPLOAD_BYTES:
                        raise Refused(f"{name}: larger than the studio's upload limit of "
                                      f"{MAX_UPLOAD_BYTES // 2**20} MiB; give its path on disk instead")
                    out.write(chunk)
        except ClientDisconnect:  # the page closed mid-upload: no one to answer, nothing to keep
            target.unlink(missing_ok=True)
            logger.warning("upload of %s abandoned after %d bytes: the partial file is removed", name, size)
            return Response(status_code=400)
        except BaseException:
            target.unlink(missing_ok=True)  # nothing half-written stays behind
            raise
        studio.draft.update({"data.train": str(target)}, ["data.format"])
        return {**state(), "stored": target.name}

    @app.get("/api/fields/{preset}")
    def fields(preset: str):
        if preset not in preview.PRESETS:
            raise TailorError(f"unknown preset {preset!r}")
        return {"fields": preview.preset_fields(preset), "defaults": preview.preset_defaults(preset)}

    @app.get("/api/rows")
    def rows():
        data = studio.draft.settings.get("data") or {}
        if not data.get("train"):
            raise TailorError("no data file chosen yet: upload one or give its path")
        path = studio.folders.readable_file(data["train"])
        preset = (studio.draft.settings.get("template") or {}).get("preset") or "classification"
        return preview.table_preview(path, data.get("format", "auto"), data.get("encoding", "utf-8"), preset,
                                     data.get("columns"))

    @app.get("/api/preview")
    def template_preview():
        return preview.template_preview(studio.draft.config())

    # ---------------------------------------------------------------- runs
    @app.post("/api/runs")
    def start_run(body: StartRequest = StartRequest()):
        return studio.start_run(body.budget)

    @app.get("/api/runs")
    def list_runs():
        return {"runs": results.run_listing(studio.folders), "queue": studio.queue.listing()}

    @app.post("/api/runs/{name:path}/stop")
    def stop_run(name: str):
        studio.folders.run_dir(name)
        return {"stopped": studio.queue.stop(name)}

    @app.post("/api/runs/{name:path}/resume")
    def resume_run(name: str):
        return studio.resume_run(name, studio.folders.run_dir(name))

    @app.get("/api/runs/{name:path}/live")
    def live(name: str):
        path = studio.folders.run_dir(name)
        job = studio.queue.get(name)
        log = studio.folders.log_file(name) if "/" not in name else None  # a group's run was not started here
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:] if log and log.is_file() else ""
        auto = (job is not None and job.kind == "auto") or studio.is_auto(name, path)
        if job and job.state in ("queued", "running"):
            status = job.state
        elif auto:  # a search that wrote its report finished; one stopped (here or elsewhere) can go on
            status = "complete" if results.is_auto_folder(path) else (
                "failed" if job and job.state == "failed" else "interrupted")
        else:
            status = results.load_run(path).status if path.is_dir() else (job.state if job else "unknown")
        progress = read_progress(studio.folders.own_file(progress_file(log)), running=status == "running") if log else None
        answer = {"name": name, "status": status, "series": {} if auto else results.live_series(path), "log": tail,
                  "progress": progress, "kind": "auto" if auto else "run"}
        return {**answer, **results.auto_summary(path, name)} if auto else answer

    @app.get("/api/runs/{name:path}/results")
    def run_results(name: str):
        path = studio.started_run(name)
        if studio.is_auto(name, path):
            return {"name": name, **results.auto_summary(path, name)}
        return results.run_results(path)

    @app.get("/api/compare")
    def compare(request: Request):
        names = request.query_params.getlist("run")
        return results.comparison([studio.started_run(n) for n in names])

    # ---------------------------------------------------------------- chat and export
    def chat_models(path: Path) -> actions.SideBySide:
        with studio.chat_lock:  # one run's models loaded at a time: memory holds two models, not two per run
            if str(path) not in studio.chats:
                for other in studio.chats.values():
                    other.close()
                studio.chats.clear()
                studio.chats[str(path)] = actions.SideBySide(path)
            return studio.chats[str(path)]

    @app.get("/api/chat/setup")
    def chat_setup(run: str):
        path = studio.folders.run_dir(run)
        return {**actions.chat_setup(path), "loaded": str(path) in studio.chats}

    @app.post("/api/chat")
    def chat(request: ChatRequest):
        """The answers as they come, one JSON object a line: {'event': 'loading'} while the run's two models load
        (once per run), then each side's pieces and its end. A page that leaves stops both models."""
        path = studio.folders.run_dir(request.run)
        setup = actions.chat_setup(path)
        if setup["mode"] == "task":
            fields = actions.check_fields(request.fields, setup["fields"])
            constrained = setup["closed"] if request.constrained is None else request.constrained
        else:
            if not request.messages:  # each message's role and text are ChatRequest's to check
                raise TailorError("chat: messages must be a non-empty list of {role, content}")
            messages = [m.model_dump() for m in request.messages]
        sampling = Sampling(request.max_new_tokens, request.temperature, request.top_p)

        def events():  # iterated in a worker thread by Starlette: loading and generating never block the loop
            try:
                pair = studio.chats.get(str(path))
                if pair is None:
                    yield {"event": "loading"}
                    pair = chat_models(path)
                yield {"event": "answering"}
                if setup["mode"] == "task":
                    yield from pair.answer_task(fields, constrained)
                else:
                    yield from pair.stream_chat(messages, sampling)
            except TailorError as e:
                yield {"event": "error", "error": str(e)}
            except Exception as e:  # the status line is sent: the failure goes in the stream, and to the terminal
                yield {"event": "error", "error": unexpected(e, "POST /api/chat")}

        return StreamingResponse((json.dumps(e) + "\n" for e in events()), media_type="application/x-ndjson")

    @app.post("/api/export")
    def export(request: ExportRequest):
        path = studio.folders.run_dir(request.run)
        return actions.start_export(studio.exports, request.run, path, request.format, request.quant or None)

    # before the export's state: {name:path} would take ".../download" as part of a run's name
    @app.get("/api/export/{name:path}/download")
    def export_download(name: str, file: str | None = None):
        """One file of the run's finished export, or (no file named) the whole export folder as a .zip."""
        studio.folders.run_dir(name)
        state = studio.exports.get(name) or {}
        if state.get("state") not in ("verified", "differs") or not state.get("folder"):
            raise TailorError(f"{name} has no finished export in this studio: export it first")
        folder = Path(state["folder"])
        if file is None:
            archive = actions.zip_folder(folder)
            return FileResponse(archive, filename=f"{name.replace('/', '-')}-{folder.name}.zip", media_type="application/zip",
                                background=BackgroundTask(archive.unlink, missing_ok=True))
        return FileResponse(actions.export_file(folder, file), filename=Path(file).name)

    @app.get("/api/export/{name:path}")
    def export_state(name: str):
        studio.folders.run_dir(name)
        return studio.exports.get(name) or {"state": "none"}

    # ---------------------------------------------------------------- what helps choose: machine, models, help
    @app.get("/api/machine")
    def machine():
        return machine_facts()

    @app.get("/api/models")
    def models():
        return {"models": installed_models(studio.folders.data)}

    @app.get("/api/help")
    def help_texts():
        return preview.setting_help()

    return app
