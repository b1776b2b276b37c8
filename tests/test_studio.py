"""tailor studio without a browser: its safety rules, its state, its run queue, and that a studio run is the CLI's run."""
import json
import os
import shutil
import signal
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import labeled_csv
from tailorlm.serve.server import BackgroundServer
from tailorlm.studio import paths
from tailorlm.studio.app import create_app
from tailorlm.studio.paths import Folders
from tailorlm.studio.queue import RunQueue
from tailorlm.studio.state import Studio

FAST = {"train.max_steps": 3, "train.batch_size": 4, "train.eval_every": 2, "eval.baselines": ["zero_shot"],
        "eval.prompting": ["free", "likelihood"], "eval.classic": False, "template.max_length": 96}


class Client:
    def __init__(self, base: str, studio: Studio):
        self.base, self.studio = base, studio

    def call(self, method: str, path: str, body=None, headers=None, raw: bytes | None = None):
        """(status, parsed JSON or text) of one request; POSTs carry X-Studio unless headers say otherwise."""
        hdrs = {"X-Studio": "1", **(headers or {})} if method == "POST" else dict(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if body is not None:
            hdrs["Content-Type"] = "application/json"
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers={k: v for k, v in hdrs.items() if v is not None})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode()
        try:
            return status, json.loads(text)
        except json.JSONDecodeError:
            return status, text

    def draft(self, changes: dict, unset=()):
        status, body = self.call("POST", "/api/draft", {"set": changes, "unset": list(unset)})
        assert status == 200, body
        return body

    def wait(self, name: str, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.call("GET", f"/api/runs/{name}/live")[1]["status"]
            if status not in ("queued", "running"):
                return status
            time.sleep(0.5)
        raise AssertionError(f"{name} still running after {timeout} s")


def start(tmp_path: Path, token: str | None = None):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    studio = Studio(Folders(tmp_path / "home", tmp_path / "runs", [data]), token)
    server = BackgroundServer(create_app(studio))
    server.__enter__()
    return Client(f"http://127.0.0.1:{server.port}", studio), server


@pytest.fixture
def client(tmp_path):
    client, server = start(tmp_path)
    yield client
    client.studio.close()
    server.__exit__()


# ---------------------------------------------------------------- paths
def test_no_request_path_reaches_outside_the_allowed_folders(tmp_path, client):
    data = tmp_path / "data"
    secret = tmp_path / "secret.csv"
    secret.write_text("text,label\nx,y\n")
    (data / "link.csv").symlink_to(secret)  # a link inside an allowed folder, pointing out of it
    (data / "dir-link").symlink_to(tmp_path)
    for given in ("../secret.csv", str(secret), "link.csv", "dir-link/secret.csv", "/etc/passwd"):
        status, body = client.call("POST", "/api/draft", {"set": {"data.train": given}})
        assert status == 403, given
        assert body["error"].startswith(f"{given}: outside the folders this studio may read (")
        assert "start it with --data FOLDER to allow another" in body["error"]
    status, body = client.call("POST", "/api/draft", {"set": {"model.path": "../secret.csv"}})
    assert status == 403 and "outside the folders" in body["error"]
    assert "data" not in client.studio.draft.settings  # nothing refused was kept
    for name in ("..", "..%2F..%2Fetc", "a%2Fb", ".hidden"):
        status, body = client.call("GET", f"/api/runs/{name}/results")
        assert status in (403, 404), name
        if status == 403:
            assert "is not a run name" in body["error"]
    labeled_csv(data / "reviews.csv")
    assert client.draft({"data.train": "reviews.csv"})["draft"]["data"]["train"] == str((data / "reviews.csv").resolve())


def test_uploads_are_size_limited_kept_in_the_studio_folder_and_never_half_written(tmp_path, client, monkeypatch):
    uploads = tmp_path / "home" / "uploads"
    status, body = client.call("POST", "/api/upload?name=../../evil.csv", raw=b"text,label\na,b\n")
    assert status == 200
    stored = uploads / body["stored"]
    assert stored.parent == uploads and stored.read_bytes() == b"text,label\na,b\n" and stored.name.startswith("evil-")
    assert body["draft"]["data"]["train"] == str(stored)
    status, body = client.call("POST", "/api/upload?name=run.sh", raw=b"echo hi")
    assert status == 403 and body["error"].startswith("run.sh: not a data file this studio reads (.csv")
    monkeypatch.setattr("tailorlm.studio.app.MAX_UPLOAD_BYTES", 1000)
    before = sorted(p.name for p in uploads.iterdir())
    status, body = client.call("POST", "/api/upload?name=big.csv", raw=b"x" * 5000)
    assert status == 403
    assert body["error"] == "big.csv: larger than the studio's upload limit of 0 MiB; give its path on disk instead"
    assert sorted(p.name for p in uploads.iterdir()) == before  # the partial file is gone


# ---------------------------------------------------------------- who may call
def test_other_hosts_and_cross_site_writes_are_refused(client):
    assert client.call("GET", "/api/state", headers={"Host": "attacker.example"}) == (
        403, "tailor studio answers requests for this machine only, not 'attacker.example'")
    status, text = client.call("POST", "/api/runs", {}, headers={"X-Studio": None})
    assert (status, text) == (403, "requests that change something must come from the studio's own pages")
    assert client.studio.queue.listing() == []


def test_a_studio_on_another_address_needs_its_token(tmp_path):
    client, server = start(tmp_path, token="s3cret-token")
    try:
        assert client.call("GET", "/api/state") == (
            401, "this studio needs its token: open the address it printed when it started")
        assert client.call("GET", "/api/state?token=wrong")[0] == 401
        request = urllib.request.Request(client.base + "/data?token=s3cret-token")
        with urllib.request.urlopen(request) as response:
            cookie = response.headers["set-cookie"]
        assert cookie.startswith("tailor_studio_token=s3cret-token") and "HttpOnly" in cookie
        assert client.call("GET", "/api/state", headers={"Cookie": "tailor_studio_token=s3cret-token"})[0] == 200
        # any Host is fine once the token guards the studio (it was started to be reached from elsewhere)
        assert client.call("GET", "/api/state", headers={"X-Studio-Token": "s3cret-token", "Host": "box:7861"})[0] == 200
    finally:
        client.studio.close()
        server.__exit__()


# ---------------------------------------------------------------- state
def test_the_draft_is_the_servers_so_a_refresh_a_second_tab_or_a_restart_sees_it(tmp_path, client):
    labeled_csv(tmp_path / "data" / "reviews.csv")
    client.draft({"data.train": "reviews.csv", "data.columns.text": "review", "train.lr": 1e-4})
    client.draft({"train.lr": None})  # cleared: back to the method's default
    status, state = client.call("GET", "/api/state")  # what any tab gets
    assert state["draft"]["data"] == {"train": str((tmp_path / "data" / "reviews.csv").resolve()),
                                      "columns": {"text": "review"}}
    assert "lr" not in state["draft"].get("train", {})
    assert yaml.safe_load(state["yaml"]) == state["draft"]
    again = Studio(Folders(tmp_path / "home", tmp_path / "runs", [tmp_path / "data"]))
    assert again.draft.settings == state["draft"]
    again.close()
    status, state = client.call("POST", "/api/draft", {"set": {"train.batch_size": 0}})
    assert status == 200 and "train.batch_size" in state["error"]  # shown, not fatal: the form can fix it


def test_the_queue_runs_one_at_a_time_and_stops_queued_and_running_runs(tmp_path):
    fake = tmp_path / "fake-python"  # stands in for `python -m tailorlm run`: waits until interrupted
    fake.write_text("#!/bin/sh\ntrap 'exit 130' INT\necho started $5\nsleep 30 &\nwait\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    queue = RunQueue(python=str(fake))
    try:
        for name in ("a", "b", "c"):
            queue.submit(name, tmp_path / f"{name}.yaml", tmp_path / name, tmp_path / f"{name}.log")
        deadline = time.monotonic() + 10
        while queue.get("a").process is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [j["state"] for j in queue.listing()] == ["running", "queued", "queued"]
        assert queue.stop("b")
        assert queue.stop("a")
        while queue.get("c").state != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [j["state"] for j in queue.listing()] == ["stopped", "stopped", "running"]
        assert queue.get("a").returncode == 130
        assert not (tmp_path / "b.log").exists()  # never started
    finally:
        queue.close()
    assert queue.get("c").state == "stopped"  # closing the studio interrupts the run in progress


def test_stop_reaches_a_run_even_when_the_studio_itself_ignores_ctrl_c(tmp_path):
    """A studio started in the background of a script has SIGINT ignored; its runs must still stop."""
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\ntrap 'exit 130' INT\necho started $5\nsleep 30 &\nwait\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    queue = RunQueue(python=str(fake))
    try:
        queue.submit("a", tmp_path / "a.yaml", tmp_path / "a", tmp_path / "a.log")
        deadline = time.monotonic() + 10
        while not (tmp_path / "a.log").is_file() or "started" not in (tmp_path / "a.log").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert queue.stop("a")
        while queue.get("a").state == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert queue.get("a").state == "stopped" and queue.get("a").returncode == 130
    finally:
        queue.close()
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------- a real run
def test_a_studio_run_equals_tailor_run_on_the_yaml_it_shows_and_survives_the_studio_stopping(tmp_path, client,
                                                                                               tiny_model_dir):
    import tailorlm
    from test_api import without_times

    data = tmp_path / "data"
    rows = labeled_csv(data / "source.csv").read_text().replace("text,label", "review,sentiment", 1)
    (data / "reviews.csv").write_text(rows)
    shutil.copytree(tiny_model_dir, data / "tiny")  # a link would point outside the allowed folders
    state = client.draft({"data.train": "reviews.csv", "data.columns.text": "review",
                          "data.columns.label": "sentiment", "model.path": "tiny", **FAST})
    assert state["error"] is None
    job = client.call("POST", "/api/runs", {})[1]
    assert client.wait(job["name"]) == "complete"
    run_dir = tmp_path / "runs" / job["name"]
    live = client.call("GET", f"/api/runs/{job['name']}/live")[1]
    assert [p[0] for p in live["series"]["train/loss"]] == [1, 2, 3]
    results = client.call("GET", f"/api/runs/{job['name']}/results")[1]
    assert {r["variant"] for r in results["tables"][0]["rows"]} >= {"zero_shot", "fine_tuned"}

    shown = tmp_path / "shown.yaml"
    shown.write_text(state["yaml"])
    cli = tailorlm.run(shown, output=tmp_path / "cli-run", quiet=True)
    assert without_times(cli.metrics) == without_times(json.loads((run_dir / "metrics.json").read_text()))

    # A long run, stopped by closing the studio mid-training: an interrupted run that --resume completes.
    client.draft({"train.max_steps": 100, "train.eval_every": 100, "train.checkpoint_every": 20, "eval.baselines": [],
                  "output.name": "long"})
    job = client.call("POST", "/api/runs", {})[1]
    run_dir = tmp_path / "runs" / job["name"]
    deadline = time.monotonic() + 120
    while not list(run_dir.glob("checkpoints/step-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    client.studio.close()
    assert client.studio.queue.get(job["name"]).state == "stopped"
    from tailorlm.track.registry import load_run

    assert load_run(run_dir).status == "interrupted"
    again, server = start(tmp_path)  # a new studio on the same folders resumes it (so would tailor run --resume)
    try:
        first = next(p.name for p in (tmp_path / "runs").iterdir() if p.name != job["name"])
        status, body = again.call("POST", f"/api/runs/{first}/resume", {})
        assert (status, body["error"]) == (400, f"{first} is complete: only an interrupted run can be resumed")
        status, body = again.call("POST", f"/api/runs/{job['name']}/resume", {})
        assert status == 200 and again.wait(job["name"]) == "complete"
    finally:
        again.studio.close()
        server.__exit__()
    assert json.loads((run_dir / "metrics.json").read_text())["train"]["steps"] == 100
    assert "interrupted" in (tmp_path / "home" / "logs" / f"{job['name']}.log").read_text()  # one log, appended
    with pytest.raises(tailorlm.TailorError, match=r"is not a run directory \(no config.yaml\)"):
        tailorlm.run(output=tmp_path / "nothing-here", resume=True)


def test_folders_refuse_names_that_are_paths(tmp_path):
    folders = Folders(tmp_path / "home", tmp_path / "runs", [tmp_path])
    for bad in ("", "../x", "a/../b", "a/b/c", "a/", "/abs", "-rf", "a//b"):
        with pytest.raises(paths.Refused, match="is not a run name"):
            folders.run_dir(bad)
    assert folders.run_dir("sst2-20261126-101500") == (tmp_path / "runs" / "sst2-20261126-101500").resolve()
    # a run of a group (a sweep's or an auto search's trial), but never through a group that links elsewhere
    assert folders.run_dir("trec-auto/trial-3") == (tmp_path / "runs" / "trec-auto" / "trial-3").resolve()
    (tmp_path / "elsewhere" / "trial-0").mkdir(parents=True)
    (tmp_path / "runs" / "linked").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(paths.Refused, match="linked/trial-0: not a run of"):
        folders.run_dir("linked/trial-0")


def test_tailor_studio_on_another_address_prints_its_token_and_requires_it(tmp_path):
    import re
    import signal
    import subprocess
    import sys

    process = subprocess.Popen([sys.executable, "-m", "tailorlm", "studio", "--host", "0.0.0.0", "--port", "0",
                                "--runs", str(tmp_path / "runs"), "--home", str(tmp_path / "home"),
                                "--data", str(tmp_path)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "COLUMNS": "200"})
    try:
        first = process.stdout.readline()
        found = re.match(r"tailor studio: (http://127\.0\.0\.1:(\d+)/)\?token=([\w-]{32})$", first.strip())
        assert found, first
        assert "Listening on 0.0.0.0: anyone who can reach it needs the token above." in process.stdout.readline()
        url, token = found.group(1), found.group(3)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "api/state", timeout=5)
            except urllib.error.HTTPError as e:
                assert e.code == 401
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "the studio did not start"
                time.sleep(0.2)
        with urllib.request.urlopen(f"{url}api/state?token={token}", timeout=5) as response:
            assert json.loads(response.read())["draft"]["output"] == {"name": "studio"}
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
