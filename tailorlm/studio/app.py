"""The studio's web server: pages rendered on the server, a JSON API the pages' small script calls.

Safety, in one place:
- Requests must name this machine as their Host (a web page elsewhere cannot rebind a name to 127.0.0.1 and
  read the studio), unless the studio was started with a token, which then guards every request.
- Every request that changes something carries the header X-Studio, which a page of another origin cannot send
  without a CORS preflight this server never answers: no cross-site request can start a run or write a file.
- Every path a request names goes through paths.Folders, which refuses anything outside the allowed folders.
"""
from __future__ import annotations

import secrets
from pathlib import Path

from fastapi import Body, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, select_autoescape

from tailorlm.errors import TailorError
from tailorlm.studio import actions, preview, results
from tailorlm.studio.paths import MAX_UPLOAD_BYTES, Refused
from tailorlm.studio.state import Studio

LOCAL_NAMES = {"127.0.0.1", "localhost", "[::1]", "::1"}
PATH_SETTINGS = ("data.train", "data.validation", "data.test", "model.path")
TOKEN_COOKIE = "tailor_studio_token"
PAGES = {"data": "Data", "template": "Template", "preflight": "Preflight", "train": "Train", "runs": "Results",
         "compare": "Compare", "chat": "Chat", "export": "Export"}


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
        response = await call_next(request)
        if set_cookie:
            response.set_cookie(TOKEN_COOKIE, studio.token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(Refused)
    async def refused(_request, exc: Refused):
        return JSONResponse({"error": str(exc)}, 403)

    @app.exception_handler(TailorError)
    async def failed(_request, exc: TailorError):
        return JSONResponse({"error": str(exc)}, 400)

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

    @app.get("/runs/{name}")
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
    def set_draft(body: dict = Body(...)):
        changes = dict(body.get("set") or {})
        for key in PATH_SETTINGS:
            value = changes.get(key)
            if value and not (key == "model.path" and value == "default"):
                changes[key] = str(studio.folders.readable_file(str(value), "model" if key == "model.path" else "file"))
        studio.draft.update(changes, list(body.get("unset") or []))
        return state()

    @app.post("/api/upload")
    async def upload(request: Request, name: str):
        target = studio.folders.upload_path(name)
        size = 0
        try:
            with open(target, "wb") as out:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > MAX_UPLOAD_BYTES:
                        raise Refused(f"{name}: larger than the studio's upload limit of "
                                      f"{MAX_UPLOAD_BYTES // 2**20} MiB; give its path on disk instead")
                    out.write(chunk)
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
        return preview.table_preview(path, data.get("format", "auto"), data.get("encoding", "utf-8"))

    @app.get("/api/preview")
    def template_preview():
        return preview.template_preview(studio.draft.config())

    # ---------------------------------------------------------------- runs
    @app.post("/api/runs")
    def start_run():
        return studio.start_run()

    @app.get("/api/runs")
    def list_runs():
        return {"runs": results.run_listing(studio.folders.runs), "queue": studio.queue.listing()}

    @app.post("/api/runs/{name}/stop")
    def stop_run(name: str):
        studio.folders.run_dir(name)
        return {"stopped": studio.queue.stop(name)}

    @app.post("/api/runs/{name}/resume")
    def resume_run(name: str):
        return studio.resume_run(studio.folders.run_dir(name))

    @app.get("/api/runs/{name}/live")
    def live(name: str):
        path = studio.folders.run_dir(name)
        job = studio.queue.get(name)
        log = studio.folders.home / "logs" / f"{name}.log"
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:] if log.is_file() else ""
        status = job.state if job and job.state in ("queued", "running") else (
            results.load_run(path).status if path.is_dir() else (job.state if job else "unknown"))
        return {"name": name, "status": status, "series": results.live_series(path), "log": tail}

    @app.get("/api/runs/{name}/results")
    def run_results(name: str):
        return results.run_results(studio.folders.run_dir(name))

    @app.get("/api/compare")
    def compare(request: Request):
        names = request.query_params.getlist("run")
        return results.comparison([studio.folders.run_dir(n) for n in names])

    # ---------------------------------------------------------------- chat and export
    @app.post("/api/chat")
    def chat(body: dict = Body(...)):  # sync: loading models runs in a worker thread, not the event loop
        path = studio.folders.run_dir(str(body.get("run", "")))
        messages = actions.check_messages(body.get("messages"))
        with studio.chat_lock:  # one run's models loaded at a time
            if path.name not in studio.chats:
                for other in studio.chats.values():
                    other.close()
                studio.chats.clear()
                studio.chats[path.name] = actions.SideBySide(path)
            pair = studio.chats[path.name]
        return pair.answer(messages, int(body.get("max_new_tokens") or 128))

    @app.post("/api/export")
    def export(body: dict = Body(...)):
        path = studio.folders.run_dir(str(body.get("run", "")))
        return actions.start_export(studio.exports, path, str(body.get("format", "gguf")), body.get("quant") or None)

    @app.get("/api/export/{name}")
    def export_state(name: str):
        studio.folders.run_dir(name)
        return studio.exports.get(name) or {"state": "none"}

    return app
