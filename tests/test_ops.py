"""The three front ends (the `tailor` verbs, the Python API, the studio) export, load models, check a resume and
compare through ops/, each operation written once.

One test reads every front-end module's imports: one of the library calls an operation wraps, imported there, is
that operation being written a second time. The others replace an operation with one that records its call and
stops, and check that each front end reaches it.
"""
from __future__ import annotations

import ast
import inspect
import time
from pathlib import Path

import pytest

import tailorlm
from tailorlm.cli import main
from tailorlm.errors import TailorError

PACKAGE = Path(tailorlm.__file__).parent
FRONT_ENDS = [PACKAGE / "__main__.py", PACKAGE / "cli.py", PACKAGE / "api.py",
              *sorted((PACKAGE / "commands").glob("*.py")), *sorted((PACKAGE / "studio").glob("*.py"))]
# What the operations are made of: the front ends call the operation instead.
WRAPPED = {
    ("tailorlm.models.trained", "load_trained"), ("tailorlm.models.loading", "resolve_device"),
    ("tailorlm.serve.engine", "Engine"), ("tailorlm.serve.llamacpp", "load_llamacpp_engine"),
    ("tailorlm.export.build", "export_run"), ("tailorlm.export.verify", "verify_export"),
    ("tailorlm.track.compare", "compare_runs"),
}


def wrapped_imports(files: list[Path]) -> list[str]:
    """'folder/file:line module.name' for each import of a WRAPPED name in files (at module level or inside a
    function)."""
    found = []
    for path in files:
        where = f"{path.parent.name}/{path.name}"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                found += [f"{where}:{node.lineno} {node.module}.{alias.name}" for alias in node.names
                          if (node.module, alias.name) in WRAPPED]
            elif isinstance(node, ast.Import):  # `import tailorlm.export.build` would reach export_run by attribute
                found += [f"{where}:{node.lineno} {alias.name}" for alias in node.names
                          if alias.name in {module for module, _ in WRAPPED}]
    return found


def test_no_front_end_imports_what_the_operations_wrap():
    assert {PACKAGE / "commands" / "serve.py", PACKAGE / "studio" / "actions.py"} <= set(FRONT_ENDS)  # globs found
    assert wrapped_imports(FRONT_ENDS) == []


def test_the_import_check_finds_an_operation_written_again(tmp_path):
    again = tmp_path / "again.py"
    again.write_text("def export(run):\n    from tailorlm.export.build import check_run_dir, export_run\n"
                     "    import tailorlm.track.compare\n")
    assert wrapped_imports([again]) == [f"{tmp_path.name}/again.py:2 tailorlm.export.build.export_run",
                                        f"{tmp_path.name}/again.py:3 tailorlm.track.compare"]


def finished_run(folder: Path) -> Path:
    """A run directory that says it finished: enough for every front end to hand it to an operation. A front end
    that bypasses the operation fails fast on it (no weights to load; a resume finds nothing left to do)."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("model: {path: default}\n")
    (folder / "run.json").write_text('{"status": "complete"}')
    (folder / "metrics.json").write_text("{}")
    return folder


def recording(calls: list, operation, message: str):
    """`operation` replaced by one that records the arguments it was given (by name, defaults filled in, so a call
    the real signature would refuse fails here too) and then stops the caller with `message`."""
    signature = inspect.signature(operation)

    def replacement(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append((operation.__name__, bound.arguments))
        raise TailorError(message)
    return replacement


def finished_state(state: dict, timeout: float = 30.0) -> dict:
    """A studio export's state once its background thread has ended."""
    deadline = time.monotonic() + timeout
    while state["state"] == "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    return state


def test_every_export_goes_through_the_one_operation(tmp_path, monkeypatch, capsys):
    from tailorlm.ops import export
    from tailorlm.studio.actions import start_export

    run = finished_run(tmp_path / "run")
    calls = []
    monkeypatch.setattr(export, "export_finished_run", recording(calls, export.export_finished_run, "exported in ops"))

    assert main(["export", str(run), "--format", "gguf", "--quant", "q8_0", "--verify"]) == 2
    assert "error: exported in ops" in capsys.readouterr().out
    with pytest.raises(TailorError, match="exported in ops"):
        tailorlm.Run(run).export("hf", output=tmp_path / "hf", verify=True)
    state = finished_state(start_export({}, run.name, run, "adapter", None))
    assert (state["state"], state["error"]) == ("failed", "exported in ops")

    assert [(Path(a["run_dir"]), a["fmt"], a["quant"], a["output"], a["verify"]) for _, a in calls] == [
        (run, "gguf", "q8_0", None, True), (run, "hf", None, tmp_path / "hf", True), (run, "adapter", None, None, True)]


def test_every_model_is_loaded_and_served_through_the_operations(tmp_path, monkeypatch, capsys):
    from tailorlm.ops import engines
    from tailorlm.studio.actions import SideBySide

    run = finished_run(tmp_path / "run")
    calls = []
    monkeypatch.setattr(engines, "open_engine", recording(calls, engines.open_engine, "engine from ops"))
    monkeypatch.setattr(engines, "load_for_inference", recording(calls, engines.load_for_inference, "loaded in ops"))

    assert main(["chat", str(run)]) == 2
    assert main(["serve", str(run), "--max-batch", "3"]) == 2
    assert main(["serve", "model.gguf", "--engine", "llamacpp", "--threads", "2"]) == 2
    assert capsys.readouterr().out.count("error: engine from ops") == 3
    assert main(["predict", str(run), "rows.jsonl", "--output", str(tmp_path / "p.jsonl"), "--device", "cpu"]) == 2
    assert "error: loaded in ops" in capsys.readouterr().out
    for use in (lambda: tailorlm.Run(run).generate("hi"), lambda: tailorlm.Run(run).predict([{"text": "hi"}]),
                lambda: SideBySide(run, "cpu")):
        with pytest.raises(TailorError, match="loaded in ops"):
            use()

    opened = [(a["model"], a["backend"], a["max_batch"], a["threads"]) for name, a in calls if name == "open_engine"]
    assert opened == [(str(run), "torch", 8, None), (str(run), "torch", 3, None), ("model.gguf", "llamacpp", 8, 2)]
    loaded = [(Path(a["model"]), a["device"]) for name, a in calls if name == "load_for_inference"]
    assert loaded == [(run, "cpu"), (run, "auto"), (run, "auto"), (run, "cpu")]


def test_every_comparison_goes_through_the_one_operation(tmp_path, monkeypatch, capsys):
    from tailorlm.ops import compare
    from tailorlm.studio.results import comparison

    first, second = finished_run(tmp_path / "a"), finished_run(tmp_path / "b")
    calls = []
    monkeypatch.setattr(compare, "compare", recording(calls, compare.compare, "compared in ops"))

    assert main(["compare", str(first), str(second), "--output", str(tmp_path / "out")]) == 2
    assert "error: compared in ops" in capsys.readouterr().out
    with pytest.raises(TailorError, match="compared in ops"):
        tailorlm.Run(first).compare(tailorlm.Run(second))
    with pytest.raises(TailorError, match="compared in ops"):
        comparison([first, second])

    assert [[Path(getattr(r, "path", r)) for r in a["runs"]] for _, a in calls] == [[first, second]] * 3
    assert not (tmp_path / "out").exists()


def test_every_resume_is_checked_by_the_one_operation(tmp_path, monkeypatch, capsys):
    from tailorlm.ops import resume

    run = finished_run(tmp_path / "run")
    calls = []
    monkeypatch.setattr(resume, "resume_config", recording(calls, resume.resume_config, "resume checked in ops"))

    assert main(["run", "--resume", str(run)]) == 2
    assert "error: resume checked in ops" in capsys.readouterr().out
    with pytest.raises(TailorError, match="resume checked in ops"):
        tailorlm.run(output=run, resume=True)

    assert [(Path(a["run_dir"]), a["asked_as"]) for _, a in calls] == [(run, "--resume"),
                                                                        (run, "tailorlm.run(resume=True)")]
