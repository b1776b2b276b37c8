"""examples/notebook.py runs end to end (DataFrame in, Run out, predict, generate, export), on the tiny model.

Its parameters cell is overridden the way papermill does it: a cell inserted right after the one tagged
"parameters", so the example runs exactly as a user reads it, with a small model and few steps."""
import json
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "notebook.py"


def with_parameters(source: str, parameters: str) -> str:
    cells = source.split("\n# %%")
    tagged = [i for i, cell in enumerate(cells) if cell.startswith(' tags=["parameters"]')]
    assert len(tagged) == 1, "the example needs exactly one parameters cell"
    cells.insert(tagged[0] + 1, "\n" + parameters)
    return "\n# %%".join(cells)


def test_the_notebook_example_runs_end_to_end(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    settings = {"train.max_steps": 3, "train.eval_every": 3, "data.limit.test": 12, "data.limit.validation": 8,
                "eval.few_shot_k": [0, 1], "eval.during_training": 4, "eval.retention.limit": 8}
    code = with_parameters(EXAMPLE.read_text(), f"MODEL = {str(tiny_model_dir)!r}\nSETTINGS = {settings!r}\n"
                                                f"OUTPUT = {str(out)!r}\n")
    namespace: dict = {"__name__": "__main__"}
    exec(compile(code, str(EXAMPLE), "exec"), namespace)

    run = namespace["run"]
    assert run.path == out and json.loads((out / "run.json").read_text())["status"] == "complete"
    results = run.results["classification"]
    assert results.n_test == 12 and run.config.data.train == "memory:train"
    assert len(namespace["predictions"]) == 5 and set(namespace["predictions"]["predicted"]) <= set(
        results.labels) | {None}
    assert namespace["folder"] == out / "export" / "gguf-f16" and any(
        p.suffix == ".gguf" for p in namespace["folder"].iterdir())
    assert namespace["again"].headline == run.headline and run.headline.startswith("classification accuracy ")
    assert run.headline in capsys.readouterr().out
