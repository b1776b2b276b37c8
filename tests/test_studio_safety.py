"""tailor studio under a hostile probe: it reads and writes only inside its folders (links, nested settings,
run names), answers malformed requests with a 400 naming the field, forgets an abandoned upload quietly, never
trains a draft twice, and takes its run with it however it is stopped."""
import json
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from pydantic import ValidationError

from conftest import labeled_csv
from test_studio import FAST, Client, client, start  # noqa: F401 (client: the studio fixture, shared)
from tailorlm.studio import queue as queue_module
from tailorlm.studio.queue import RunQueue
from tailorlm.studio.requests import ChatRequest, ExportRequest, describe

SECRET = "password: hunter2"


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "secret.txt"  # in no folder the studio may read
    path.write_text(SECRET + "\n")
    return path


def fake_run(folder: Path, name: str, link: str | None = None, target: Path | None = None) -> Path:
    """A run folder as `tailor run` leaves it, with one of its files (or folders) a symbolic link to target."""
    run = folder / name
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "config.yaml").write_text("output:\n  name: fake\n")
    (run / "run.json").write_text(json.dumps({"status": "complete", "started": "2026-01-01T00:00:00"}))
    if link:
        (run / link).unlink(missing_ok=True)
        (run / link).symlink_to(target)
    return run


def outside(tmp_path: Path, given) -> str:
    readable = ", ".join(str((tmp_path / folder).resolve()) for folder in ("home", "runs", "data"))
    return f"{given}: outside the folders this studio may read ({readable}); start it with --data FOLDER to allow " \
           f"another"


def linked_out(name: str, link: str) -> str:
    return f"{name}: refused: {link} is a symbolic link leading out of the run folder, and the studio opens no run " \
           f"that holds one"


def waiting_queue(tmp_path: Path) -> RunQueue:
    """A queue whose runs wait until interrupted and create no run folder, standing in for `tailor run`."""
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\ntrap 'exit 130' INT\nsleep 30 &\nwait\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return RunQueue(python=str(fake))


def eventually(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# ---------------------------------------------------------------- 1. reading outside the folders
def test_a_run_folder_holding_a_link_out_of_itself_is_refused_by_every_route_and_listed_as_refused(tmp_path, client,
                                                                                                    secret):
    runs = tmp_path / "runs"
    outside_model = tmp_path / "elsewhere-model"
    outside_model.mkdir()
    linked = {"config-linked": "config.yaml", "metrics-linked": "metrics.json", "live-linked": "live.jsonl",
              "predictions-linked": "predictions.jsonl", "manifest-linked": "manifest.json",
              "deep-linked": "checkpoints/step-2/train_log.json", "weights-linked": "adapter"}
    for name, link in linked.items():
        fake_run(runs, name, link, outside_model if link == "adapter" else secret)
    fake_run(runs, "inner-link", "latest.json", Path("run.json"))  # a link within its own folder is harmless
    fake_run(tmp_path / "elsewhere", "away")
    (runs / "away").symlink_to(tmp_path / "elsewhere" / "away")  # the run folder itself leads out of runs

    for name, link in linked.items():
        for method, path, body in (("GET", f"/api/runs/{name}/results", None), ("GET", f"/api/runs/{name}/live", None),
                                   ("GET", f"/api/compare?run=inner-link&run={name}", None),
                                   ("GET", f"/runs/{name}", None), ("POST", f"/api/runs/{name}/resume", {}),
                                   ("POST", "/api/export", {"run": name, "format": "hf"}),
                                   ("POST", "/api/chat", {"run": name, "messages": [{"role": "user", "content": "x"}]}),
                                   ("GET", f"/api/chat/setup?run={name}", None)):
            status, answer = client.call(method, path, body)
            assert (status, answer) == (403, {"error": linked_out(name, link)}), (method, path)
    assert client.studio.exports == {} and client.studio.chats == {}
    status, answer = client.call("GET", "/api/runs/away/results")
    assert (status, answer) == (403, {"error": f"away: not a run of {runs.resolve()}"})

    status, body = client.call("GET", "/api/runs/inner-link/results")
    assert status == 200 and body["config"] == "output:\n  name: fake\n"
    status, listing = client.call("GET", "/api/runs")
    assert SECRET not in json.dumps(listing)
    rows = {row["name"]: row for row in listing["runs"]}
    assert rows["config-linked"]["status"] == "refused"
    assert rows["config-linked"]["error"] == linked_out("config-linked", "config.yaml")
    assert rows["away"] == {"name": "away", "status": "refused", "started": "", "method": "", "headline": "",
                            "error": f"away: refused: it is a symbolic link leading out of {runs.resolve()}"}
    assert rows["inner-link"]["status"] == "complete"
    assert {n for n, r in rows.items() if r["status"] == "refused"} == {*linked, "away"}


def test_the_studios_own_log_files_are_refused_when_they_are_links(tmp_path, client, secret):
    logs = tmp_path / "home" / "logs"
    (logs / "leaky.log").symlink_to(secret)
    status, body = client.call("GET", "/api/runs/leaky/live")
    assert (status, body) == (403, {"error": f"{logs.resolve() / 'leaky.log'}: refused: the studio's own files are "
                                             f"never symbolic links"})


def test_every_file_setting_is_checked_wherever_it_sits_in_the_draft(tmp_path, client, secret):
    data = tmp_path / "data"
    labeled_csv(data / "reviews.csv")
    before = client.call("GET", "/api/state")[1]["draft"]
    task = {"name": "a", "data": {"train": "reviews.csv"}}
    for change, given in (({"data": {"train": str(secret)}}, secret),  # a nested object, not a dotted key
                          ({"data.validation": str(secret)}, secret),
                          ({"data": {"test": "../secret.txt"}}, "../secret.txt"),
                          ({"eval.retention.data": str(secret)}, secret),
                          ({"eval.retention": {"data": str(secret)}}, secret),
                          ({"eval": {"retention": {"data": str(secret)}}}, secret),
                          ({"tasks": [{**task, "data": {"train": "reviews.csv", "validation": str(secret)}}]}, secret),
                          ({"tasks": [task, {"name": "b", "data": {"train": str(secret)}}]}, secret),
                          ({"model": {"path": str(tmp_path)}}, tmp_path), ({"x": {"data.train": str(secret)}}, secret)):
        assert client.call("POST", "/api/draft", {"set": change}) == (403, {"error": outside(tmp_path, given)}), change
    status, body = client.call("POST", "/api/draft", {"set": {"data.train": ["reviews.csv"]}})
    assert (status, body) == (400, {"error": "data.train: a path is text, not list"})
    status, body = client.call("POST", "/api/draft", raw=b'{"set": {"train.lr": NaN}}',
                               headers={"Content-Type": "application/json"})
    assert (status, body) == (400, {"error": "train.lr: nan is not a number a setting can hold"})
    assert client.call("GET", "/api/state")[1]["draft"] == before  # nothing refused was kept
    assert not (tmp_path / "home" / "draft.json").exists()  # nor saved

    state = client.draft({"tasks": [{"name": "a", "data": {"train": "reviews.csv"}}],
                          "eval.retention.data": "builtin:general"})
    assert state["draft"]["tasks"] == [{"name": "a", "data": {"train": str((data / "reviews.csv").resolve())}}]
    assert state["draft"]["eval"]["retention"]["data"] == "builtin:general"
    state = client.draft({"eval.retention": {"data": "reviews.csv"}})
    assert state["draft"]["eval"]["retention"]["data"] == str((data / "reviews.csv").resolve())


# ---------------------------------------------------------------- 2. writing outside the folders
def test_settings_that_would_place_files_outside_are_refused(tmp_path, client):
    runs = (tmp_path / "runs").resolve()
    for name in ("../escape", str(tmp_path / "escape"), "a/b", ".hidden", "x" * 81):
        status, body = client.call("POST", "/api/draft", {"set": {"output.name": name}})
        assert (status, body) == (403, {"error": f"output.name {name!r} is not a plain run name (up to 80 letters, "
                                                 f"digits, '.', '_' and '-'): the studio places every run in {runs}"})
    status, body = client.call("POST", "/api/draft", {"set": {"output": {"dir": str(tmp_path / "escape")}}})
    assert (status, body) == (403, {"error": f"output.dir: the studio places every run in {runs} under output.name "
                                             f"and a time; set output.name instead"})
    status, body = client.call("POST", "/api/draft", {"set": {"track.mlflow_uri": f"sqlite:///{tmp_path}/x.db"}})
    assert (status, body) == (403, {"error": f"track.mlflow_uri 'sqlite:///{tmp_path}/x.db': the studio keeps "
                                             f"MLflow's local store beside its runs; name an http(s):// tracking "
                                             f"server or leave it empty"})
    status, body = client.call("POST", "/api/draft", {"set": {"tasks": [{"name": "../../x", "data": {}}]}})
    assert (status, body) == (403, {"error": "tasks.name '../../x': a task name becomes a folder of its run "
                                             "(tasks/NAME), so it must be a plain name (letters, digits, '.', '_' "
                                             "and '-')"})
    assert client.call("GET", "/api/state")[1]["draft"]["output"] == {"name": "studio"}
    assert client.draft({"output.name": "sst2_v2.1"})["draft"]["output"] == {"name": "sst2_v2.1"}


@pytest.mark.parametrize("saved", ["data outside", "a name that is a path"])
def test_a_saved_draft_is_checked_again_when_used(tmp_path, secret, saved):
    """A draft saved before these rules, or with folders the studio no longer has, is refused where it is used:
    by the template preview and, again, when a run starts."""
    runs = (tmp_path / "runs").resolve()
    escaping = f"output.name '../../escape' is not a plain run name (up to 80 letters, digits, '.', '_' and '-'): " \
               f"the studio places every run in {runs}"
    draft, error = ({"data": {"train": str(secret)}}, outside(tmp_path, secret)) if saved == "data outside" else (
        {"output": {"name": "../../escape"}}, escaping)
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "draft.json").write_text(json.dumps(draft))
    client, server = start(tmp_path)
    try:
        for method, path in (("GET", "/api/preview"), ("POST", "/api/runs")):
            assert client.call(method, path, {} if method == "POST" else None) == (403, {"error": error}), path
        assert client.call("GET", "/api/state")[1]["error"] == error  # shown, so the form can fix it
        assert client.studio.queue.listing() == [] and not list((tmp_path / "home" / "configs").iterdir())
        assert not list(tmp_path.glob("escape*")) and not list(runs.iterdir())
    finally:
        client.studio.close()
        server.__exit__()


# ---------------------------------------------------------------- 3. malformed requests
def test_malformed_requests_are_400s_naming_the_field(client, caplog):
    cases = [({"set": [1, 2]}, "set: Input should be a valid dictionary"),
             ([1, 2], "the request body: Input should be a valid dictionary or object to extract fields from"),
             ({"unset": "data.train"}, "unset: Input should be a valid list"),
             ({"unset": [1]}, "unset.0: Input should be a valid string"),
             ({"sett": {}}, "sett: Extra inputs are not permitted")]
    for body, error in cases:
        assert client.call("POST", "/api/draft", body) == (400, {"error": error}), body
    status, body = client.call("POST", "/api/draft", raw=b'{"set": ', headers={"Content-Type": "application/json"})
    assert (status, body) == (400, {"error": "the request body is not valid JSON (Expecting value)"})
    assert client.call("POST", "/api/upload", raw=b"x") == (400, {"error": "name: Field required"})
    assert not [r for r in caplog.records if r.exc_info]  # no traceback for any of them


def test_chat_and_export_requests_are_checked_field_by_field():
    def error(model, body: dict) -> str:
        with pytest.raises(ValidationError) as caught:
            model.model_validate(body)
        return describe([{**e, "loc": ("body", *e["loc"])} for e in caught.value.errors()])

    chat = {"run": "r", "messages": [{"role": "user", "content": "hi"}]}
    assert error(ChatRequest, {**chat, "max_new_tokens": "abc"}) == \
        "max_new_tokens: Input should be a valid integer, unable to parse string as an integer"
    assert error(ChatRequest, {**chat, "max_new_tokens": 0}) == \
        "max_new_tokens: Input should be greater than or equal to 1"
    assert error(ChatRequest, {**chat, "max_new_tokens": 1025}) == \
        "max_new_tokens: Input should be less than or equal to 1024"
    assert error(ChatRequest, {**chat, "temperature": 2.5}) == "temperature: Input should be less than or equal to 2"
    assert error(ChatRequest, {**chat, "top_p": 0}) == "top_p: Input should be greater than 0"
    assert error(ChatRequest, {**chat, "run": 5}) == "run: Input should be a valid string"
    assert error(ChatRequest, {**chat, "messages": [{"role": "root", "content": "x"}]}) == \
        "messages.0.role: Input should be 'system', 'user' or 'assistant'"
    assert error(ChatRequest, {**chat, "fields": {"text": 3}}) == "fields.text: Input should be a valid string"
    ok = ChatRequest.model_validate({**chat, "fields": {"text": "a film"}})
    assert (ok.max_new_tokens, ok.temperature, ok.top_p, ok.fields) == (128, 0.0, 1.0, {"text": "a film"})
    assert error(ExportRequest, {"run": "r", "format": 5}) == "format: Input should be 'hf', 'adapter' or 'gguf'"
    assert error(ExportRequest, {"format": "hf"}) == "run: Field required"
    assert ExportRequest.model_validate({"run": "r"}).format == "gguf"


def test_an_unexpected_error_is_a_json_500_with_its_traceback_logged_once(client, caplog, monkeypatch):
    def broken():
        raise RuntimeError("boom")

    monkeypatch.setattr(client.studio.queue, "listing", broken)
    with caplog.at_level(logging.ERROR):
        status, body = client.call("GET", "/api/state")
    assert (status, body) == (500, {"error": "unexpected RuntimeError: boom (a tailorlm bug; the studio's terminal "
                                             "has the details)"})
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1 and logged[0].getMessage() == "GET /api/state failed"


# ---------------------------------------------------------------- 4. an abandoned upload
def test_an_abandoned_upload_leaves_no_file_and_no_traceback(tmp_path, client):
    records: list[logging.LogRecord] = []
    collect = logging.Handler()
    collect.emit = records.append
    watched = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "tailorlm.studio")]
    for logger in watched:
        logger.addHandler(collect)
    uploads = tmp_path / "home" / "uploads"
    try:
        port = int(client.base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /api/upload?name=big.csv HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Studio: 1\r\n"
                         b"Content-Length: 1000000\r\n\r\n" + b"text,label\n" * 1000)
            eventually(lambda: any(uploads.iterdir()))  # the partial file is being written
        eventually(lambda: not any(uploads.iterdir()) and records)
        time.sleep(0.3)  # anything else the server would log about it
    finally:
        for logger in watched:
            logger.removeHandler(collect)
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records]
    messages = {r.getMessage() for r in records}  # one line, seen by each logger it passes
    assert len(messages) == 1
    assert re.fullmatch(r"upload of big\.csv abandoned after \d+ bytes: the partial file is removed", messages.pop())
    assert client.call("GET", "/api/state")[0] == 200  # the studio carries on


# ---------------------------------------------------------------- 6. the queue: duplicates, stops, missing runs
def test_start_pressed_twice_queues_one_run_and_a_queued_run_has_no_results_yet(tmp_path, client):
    client.studio.queue.close()
    client.studio.queue = waiting_queue(tmp_path)
    first = client.call("POST", "/api/runs", {})[1]["name"]
    eventually(lambda: client.studio.queue.get(first).process is not None)
    assert client.call("POST", "/api/runs", {}) == (409, {
        "error": f"this draft is already running as {first}; stop it or change a setting first", "run": first})
    client.draft({"train.lr": 1e-4})
    second = client.call("POST", "/api/runs", {})[1]["name"]
    assert client.call("POST", "/api/runs", {}) == (409, {
        "error": f"this draft is already queued as {second}; stop it or change a setting first", "run": second})
    assert client.call("GET", f"/api/runs/{second}/results") == (
        404, {"error": f"{second} has not started: it has no run folder yet"})
    assert client.call("GET", "/api/runs/nothing-here/results") == (
        404, {"error": f"nothing-here: no such run in {(tmp_path / 'runs').resolve()}"})
    assert client.call("POST", f"/api/runs/{second}/stop", {}) == (200, {"stopped": True})
    queue = client.call("GET", "/api/state")[1]["queue"]
    assert [(j["name"], j["state"]) for j in queue] == [(first, "running"), (second, "stopped")]
    assert client.call("POST", "/api/runs", {})[0] == 200  # stopped, so no longer a duplicate
    assert len(client.studio.queue.listing()) == 3


def test_a_stop_while_the_run_is_starting_is_not_lost(tmp_path, monkeypatch):
    started, release = threading.Event(), threading.Event()
    real_popen = subprocess.Popen

    def slow_popen(*args, **kwargs):  # the moment between the queue taking a job and the process existing
        started.set()
        release.wait(10)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(queue_module.subprocess, "Popen", slow_popen)
    queue = waiting_queue(tmp_path)
    try:
        queue.submit("a", tmp_path / "a.yaml", tmp_path / "a", tmp_path / "a.log")
        assert started.wait(10)
        assert queue.get("a").state == "running" and queue.get("a").process is None
        assert queue.stop("a")
        release.set()
        eventually(lambda: queue.get("a").state != "running")
        assert queue.get("a").state == "stopped" and queue.active() == []
    finally:
        release.set()
        queue.close()


# ---------------------------------------------------------------- 5. stopping the studio stops its run
def _alive(pid: int) -> bool:
    """Whether process pid still runs (a zombie no longer does)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat_line.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_stopping_or_killing_the_studio_interrupts_its_run(tmp_path, tiny_model_dir, how):
    from tailorlm.track.registry import load_run

    data = tmp_path / "data"
    labeled_csv(data / "reviews.csv")
    studio = subprocess.Popen([sys.executable, "-m", "tailorlm", "studio", "--port", "0", "--runs",
                               str(tmp_path / "runs"), "--home", str(tmp_path / "home"), "--data", str(data),
                               "--data", str(tiny_model_dir)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "COLUMNS": "200"})
    run = None
    try:
        url = re.match(r"tailor studio: (http://127\.0\.0\.1:\d+)/$", studio.stdout.readline().strip()).group(1)
        client = Client(url, None)
        eventually(lambda: _answers(url), timeout=30)
        client.draft({"data.train": "reviews.csv", "model.path": str(tiny_model_dir), **FAST,
                      "train.max_steps": 10000, "train.eval_every": 10000, "eval.baselines": []})
        run_dir = tmp_path / "runs" / client.call("POST", "/api/runs", {})[1]["name"]
        eventually(lambda: (run_dir / "run.json").is_file() and "pid" in json.loads((run_dir / "run.json").read_text()),
                   timeout=120)
        run = json.loads((run_dir / "run.json").read_text())["pid"]
        assert _alive(run)
        studio.send_signal(how)
        eventually(lambda: not _alive(run), timeout=60)
        ended = load_run(run_dir)
        assert ended.status == "interrupted", ended.state  # resumable with tailor run --resume (else: its error)
        if how == signal.SIGTERM:
            assert studio.wait(timeout=30) == 0
            assert "tailor studio stopped." in studio.stdout.read()
    finally:
        if studio.poll() is None:
            studio.kill()
        studio.wait()
        if run is not None and _alive(run):  # the failure this test looks for: leave no orphan behind it
            os.kill(run, signal.SIGKILL)


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url + "/api/state", timeout=5).close()
        return True
    except (urllib.error.URLError, ConnectionError):
        return False
