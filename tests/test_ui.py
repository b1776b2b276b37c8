"""Progress output: plain lines into a file or a pipe, one live display in a terminal even when bars nest."""
import io

import pytest

from tailorlm import ui


def test_into_a_pipe_each_progress_is_one_line_when_done(capsys):
    with ui.progress("train", 3) as advance:
        for _ in range(3):
            with ui.progress("eval validation @1", 2) as inner:
                inner(2)
            advance(1, "loss 0.500")
    assert capsys.readouterr().out.splitlines() == [
        "eval validation @1: 2/2 in 0:00:00", "eval validation @1: 2/2 in 0:00:00",
        "eval validation @1: 2/2 in 0:00:00", "train: 3/3 in 0:00:00, loss 0.500"]


def test_a_long_line_into_a_pipe_stays_one_line(capsys):
    ui.console.print("step 0/40: " + ", ".join(f"metric_{i} 0.{i:03d}" for i in range(12)))
    assert len(capsys.readouterr().out.splitlines()) == 1


def test_a_stage_title_too_long_for_its_rule_is_printed_whole(capsys):
    ui.stage("Prompting baselines: ner")
    assert "Prompting baselines: ner" in capsys.readouterr().out
    title = "Prompting baselines: ner (the starting model, runs/wnut17-sft-20261207-154624; entities [as list])"
    ui.stage(title)
    rule, line = capsys.readouterr().out.splitlines()
    assert set(rule) == {"─"} and line == title


@pytest.fixture
def terminal(monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(ui, "console", ui._Console(file=screen, force_terminal=True, width=100))
    return screen


def test_in_a_terminal_a_nested_bar_joins_the_outer_display_and_leaves_it(terminal):
    with ui.progress("train", 2) as advance:
        outer = ui._local.shown[-1]
        with ui.progress("eval validation @1", 4) as inner:
            assert ui._local.shown == [outer, outer]  # the same display, one more task
            assert [t.description for t in outer.tasks] == ["train", "eval validation @1"]
            inner(4)
        assert [t.description for t in outer.tasks] == ["train"]
        with pytest.raises(RuntimeError):
            with ui.progress("eval validation @2", 4):
                raise RuntimeError("a failed evaluation")
        assert ui._local.shown == [outer] and [t.description for t in outer.tasks] == ["train"]
        advance(2, "loss 0.250")
    assert ui._local.shown == []
    assert "train" in terminal.getvalue() and "loss 0.250" in terminal.getvalue()
