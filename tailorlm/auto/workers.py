"""The roll call of the workers that share one `tailor auto` study, so that they all choose one winner.

Each worker chooses the winner from the trials it can see. Two workers whose searches end at different times
see different trials: the first to end could choose its best while the other still trains a top-rung trial
that would beat it, and then both would score "their" winner on test and write one folder's leaderboard.

So each worker checks in when its search starts (a user attribute of the study: its host, pid and the wall-clock
time by which it will have ended) and checks out when its search ends. It then waits until no other worker is
still searching, and only then reads the study's trials and chooses. Every worker then chooses from the same
finished trials by the same rule (search.choose_winner), so they agree. A worker renews its stated end before
each trial and while it waits for another's trial; one whose search fails checks out at once.

A worker that is gone is not waited for: on this machine its pid no longer exists; on another machine (no pid
to look at) its stated end has passed.

Only one worker scores the winner on test and writes the leaderboard: the one that trained it (its folder is on
that worker's machine). Another worker leaves it to that one while it lives, or once it has recorded the scoring
(`scored`) during this worker's run; it scores the winner itself only when that worker, on this machine, stopped
before scoring. A winner trained on another machine is always left to its trainer: its folder is there.

The roll call makes the workers of one run agree. A worker started after the others have chosen reads their
trials back and may go on searching with its own budget; it then chooses from what it sees, as a resumed run
does.
"""
from __future__ import annotations

import os
import socket
import time

import optuna

from tailorlm.sweep.study import worker_alive
from tailorlm.ui import console

PREFIX = "worker "
POLL_S = 5.0  # how often a waiting worker looks at the roll call again


def _me() -> str:
    return f"{PREFIX}{socket.gethostname()} {os.getpid()}"


def check_in(study: optuna.Study, ends_by: float) -> None:
    """This worker is searching, and will have ended by `ends_by` (time.time())."""
    study.set_user_attr(_me(), {"state": "searching", "ends_by": ends_by})


def check_out(study: optuna.Study) -> None:
    study.set_user_attr(_me(), {"state": "done", "ends_by": time.time()})


def still_searching(study: optuna.Study) -> list[str]:
    """The other workers whose search has not ended, as "host pid"."""
    here, me, now = socket.gethostname(), _me(), time.time()
    waiting = []
    for key, entry in study.user_attrs.items():
        if not key.startswith(PREFIX) or key == me or not isinstance(entry, dict) or entry.get("state") != "searching":
            continue
        host, _, pid = key.removeprefix(PREFIX).rpartition(" ")
        alive = worker_alive(int(pid)) if host == here else now < float(entry.get("ends_by", 0))
        if alive:
            waiting.append(f"{host} {pid}")
    return waiting


def scored(study: optuna.Study, winner) -> None:
    """Record that this worker scored the winner on test and wrote the leaderboard."""
    study.set_user_attr("scored", {"number": winner.number, "at": time.time(), "by": _me().removeprefix(PREFIX)})


def scored_by_peer(study: optuna.Study, winner, since: float) -> bool:
    """Whether the winner was scored on test by a worker during this run (since `since`, time.time())."""
    record = study.user_attrs.get("scored") or {}
    return record.get("number") == winner.number and record.get("at", 0) >= since


def left_to_its_trainer(study: optuna.Study, winner, since: float) -> str | None:
    """Who scores the winner when it is not this worker: "worker <pid> on <host>", the worker that trained it,
    while that worker lives or once it has scored the winner since `since` (this run's start, time.time()). None
    when this worker scores it: it trained it, or its trainer stopped first (a stopped worker of this machine)."""
    here = socket.gethostname()
    if winner.host is None or (winner.host, winner.pid) == (here, os.getpid()):
        return None
    if winner.host == here and not scored_by_peer(study, winner, since) and \
            (winner.pid is None or not worker_alive(winner.pid)):
        return None
    return f"worker {winner.pid} on {winner.host}" + (" (this machine)" if winner.host == here else "")


def wait_for_the_others(study: optuna.Study, poll: float = POLL_S) -> None:
    """Check out, then wait until no other worker of the study is searching."""
    check_out(study)
    said = False
    while others := still_searching(study):
        if not said:
            console.print(f"Waiting for the search of worker(s) {', '.join(others)} to end before choosing the "
                          f"winner")
            said = True
        time.sleep(poll)
