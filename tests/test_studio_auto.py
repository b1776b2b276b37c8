"""The studio's auto search: Start with a budget runs `tailor auto` on the draft, the live panel and the run page
show its leaderboard, and its winner (a run of the search's folder, GROUP/NAME) opens like any run. The search
itself is tailor auto's (tests/test_auto.py); here a stand-in writes what it leaves."""
import json
import stat
from pathlib import Path

from test_studio import Client, client  # noqa: F401 (client: the studio fixture, shared)
from test_studio_safety import eventually, waiting_queue
from tailorlm.studio.queue import RunQueue

# Stands in for `python -m tailorlm auto CONFIG --budget B --output DIR`: records its arguments, then writes an
# auto folder as tailor auto leaves it: a finished trial run, leaderboard.md and auto.json naming the winner.
FAKE_AUTO = """#!/bin/sh
printf '%s\\n' "$@" > "$ARGS_FILE"
out="$8"
mkdir -p "$out/trial-0/checkpoints"
printf 'output:\\n  name: fake\\n' > "$out/trial-0/config.yaml"
printf '{"status": "complete", "started": "2026-01-01T00:00:00"}' > "$out/trial-0/run.json"
printf '# Auto: studio\\n\\n| trial | model |\\n' > "$out/leaderboard.md"
printf '{"winner": {"key": "tiny | LoRA r16, lr 0.0003", "run_dir": "%s/trial-0"}, "trials": []}' "$out" > "$out/auto.json"
"""


def fake_auto_queue(tmp_path: Path, monkeypatch) -> RunQueue:
    fake = tmp_path / "fake-auto"
    fake.write_text(FAKE_AUTO)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("ARGS_FILE", str(tmp_path / "args.txt"))
    return RunQueue(python=str(fake))


def test_an_auto_search_from_the_studio_shows_its_leaderboard_and_opens_its_winner(tmp_path, client: Client,
                                                                                    monkeypatch):
    client.studio.queue.close()
    client.studio.queue = fake_auto_queue(tmp_path, monkeypatch)
    assert client.call("POST", "/api/runs", {"budget": "soon"}) == (400, {
        "error": "the auto search's budget 'soon': give a duration such as 20m, 1h, 1h30m or 90s"})
    assert client.call("POST", "/api/runs", {"budget": ""})[0] == 400
    job = client.call("POST", "/api/runs", {"budget": "20m"})[1]
    name = job["name"]
    assert job["kind"] == "auto" and name.startswith("studio-auto-")
    assert client.wait(name) == "complete"
    run_dir = (tmp_path / "runs" / name).resolve()
    config = (tmp_path / "home" / "configs" / f"{name}.yaml").resolve()
    assert (tmp_path / "args.txt").read_text().split("\n")[:-1] == [
        "-m", "tailorlm", "auto", str(config), "--budget", "20m", "--output", str(run_dir)]

    live = client.call("GET", f"/api/runs/{name}/live")[1]
    winner = f"{name}/trial-0"
    assert (live["kind"], live["status"], live["winner"], live["winner_key"]) == (
        "auto", "complete", winner, "tiny | LoRA r16, lr 0.0003")
    assert live["leaderboard"].startswith("# Auto: studio")
    results = client.call("GET", f"/api/runs/{name}/results")[1]
    assert (results["kind"], results["winner"]) == ("auto", winner)
    # the winner is a run of the search's folder: its page, results and live state open by GROUP/NAME
    assert client.call("GET", f"/runs/{winner}")[0] == 200
    assert client.call("GET", f"/api/runs/{winner}/results")[1]["status"] == "complete"
    assert client.call("GET", f"/api/runs/{winner}/live")[1]["kind"] == "run"
    listing = {row["name"]: row for row in client.call("GET", "/api/runs")[1]["runs"]}
    assert listing[name]["method"] == "auto" and winner in listing[name]["headline"] and winner in listing
    assert client.call("POST", f"/api/runs/{name}/resume", {}) == (400, {
        "error": f"{name} is a finished auto search: start a new one to search again"})
    assert client.call("POST", f"/api/runs/{winner}/resume", {}) == (400, {
        "error": f"{winner} is a trial of a search: run the search again (the same tailor sweep or tailor auto "
               f"command) and it goes on where it stopped"})


def test_a_stopped_auto_search_resumes_with_its_budget(tmp_path, client: Client):
    client.studio.queue.close()
    client.studio.queue = waiting_queue(tmp_path)
    name = client.call("POST", "/api/runs", {"budget": "45m"})[1]["name"]
    eventually(lambda: client.studio.queue.get(name).process is not None)
    assert client.call("GET", f"/api/runs/{name}/live")[1]["status"] == "running"
    assert client.call("POST", f"/api/runs/{name}/stop", {}) == (200, {"stopped": True})
    eventually(lambda: client.studio.queue.get(name).state == "stopped")
    live = client.call("GET", f"/api/runs/{name}/live")[1]
    assert (live["kind"], live["status"], live["winner"]) == ("auto", "interrupted", None)
    resumed = client.call("POST", f"/api/runs/{name}/resume", {})[1]
    assert (resumed["name"], resumed["kind"]) == (name, "auto")
    job = client.studio.queue.get(name)
    assert job.resume and job.command()[:4] == ["auto", str(job.config), "--budget", "45m"]
    eventually(lambda: job.process is not None)
    client.studio.queue.stop(name)
