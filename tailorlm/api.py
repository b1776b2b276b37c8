"""tailorlm from Python: one call trains and measures, and a `Run` is what it gives back.

    import tailorlm
    run = tailorlm.run("examples/sst2.yaml", data=df, train__lr=1e-4)   # or tailorlm.run() for the default job
    run.results["classification"].fine_tuned         # the headline figure; run.metrics is metrics.json
    run.predict([{"text": "a gripping, funny film"}])
    run.export("gguf")
    tailorlm.load("runs/sst2-20261125-101500").compare(run)

`tailor run` is a layer over tailorlm.run; a Run's predict, generate, chat, export and compare are the operations
in ops/ that the other `tailor` verbs and the studio run too. Nothing global changes on import or on a call:
library logging is quieted only when the call says `quiet=True` (the CLI does), and the rest puts back what it
changes.

`import tailorlm` loads this module; torch, transformers and the pipeline load inside the calls that need
them, so importing the package takes a fraction of a second (that is why the imports below are local).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from tailorlm.config import RunConfig, load_config
from tailorlm.errors import TailorError
from tailorlm.rundir import RunDir

def run(config: str | Path | RunConfig | Mapping | None = None, *, data: Any = None, model: Any = None,
        tokenizer: Any = None, output: str | Path | None = None, overrides: Iterable[str] | Mapping = (),
        resume: bool = False, trust_remote_code: bool = False, quiet: bool = False, allow_code: bool = False,
        **settings) -> Run:
    """Fine-tune and measure, exactly as `tailor run` does; returns the finished `Run`.

    config: a YAML path, a RunConfig, a dict of settings, or None for the embedded default job.
    data: training data, overriding data.train: a file path, a pandas DataFrame, a list of dicts, a
        `datasets.Dataset`, a `DatasetDict` (its train/validation/test splits), or {"train": ..., "test": ...}.
    model: model.path (a folder, a .gguf, "default"), or a loaded transformers model (pass its `tokenizer`).
    overrides: "key=value" strings or a {dotted.key: value} mapping; settings: the same as keywords, with
        "__" for the dots (train__lr=1e-4).
    output: the run directory (default runs/<output.name>-<timestamp>); resume=True continues the interrupted
        run there from its latest complete checkpoint, with the config it was started with (its config.yaml
        when config is None).
    quiet: lower transformers/PEFT logging to errors for this process (what the CLI does).
    allow_code: let a GRPO reward function the config names run (the CLI's --allow-code).
    """
    from tailorlm.models.loading import LoadedModel, quiet_library_logs
    from tailorlm.pipeline import run_stages

    given = None
    extra = _override_list(overrides) + _override_list({k.replace("__", "."): v for k, v in settings.items()})
    loaded = None
    if tokenizer is not None and (model is None or isinstance(model, (str, Path))):
        raise TailorError("tailorlm.run(tokenizer=...): a tokenizer goes with a loaded model (model=...); a model "
                          "given as a path, or the config's, brings its own")
    if isinstance(model, (str, Path)):
        extra.append(f"model.path={model}")
    elif model is not None:
        if tokenizer is None:
            raise TailorError("tailorlm.run(model=...): a loaded model needs its tokenizer too (tokenizer=...)")
        source = getattr(model.config, "_name_or_path", "") or type(model).__name__
        extra.append(f"model.path={source}")
        loaded = LoadedModel(model, tokenizer, source)
    if data is not None:
        if isinstance(data, (str, Path)):
            extra.append(f"data.train={data}")
        else:
            from tailorlm.data.memory import in_memory_sources

            fields, given = in_memory_sources(data)
            # None (validation, test): null, as a config spells "split it off the training data"
            extra += [f"data.{split}={'null' if source is None else source}" for split, source in fields.items()]
    if resume and config is None and output is not None:  # the run's own config, as `tailor run --resume` reads it
        from tailorlm.ops.resume import resume_config

        config = resume_config(output, "tailorlm.run(resume=True)")
    cfg = _config(config, extra, trust_remote_code, allow_code)
    if quiet:
        quiet_library_logs()
    outcome = run_stages(cfg, Path(output) if output else None, resume, given=given, model=loaded)
    return Run(outcome.run_dir.path, _outcome=outcome)


def auto(config: str | Path | None = None, *, budget: str | float, models: Iterable[str | Path] = (),
         embedded: bool = True, output: str | Path | None = None, overrides: Iterable[str] | Mapping = (),
         storage: str | None = None, trust_remote_code: bool = False, quiet: bool = False,
         data_curve: bool = False, search_recipe: bool = False):
    """Choose the model and recipe for the config's task within `budget`, as `tailor auto` does; returns its
    outcome (`.out`, the auto folder with leaderboard.md; `.search.winner.run_dir`, a finished run that
    `tailorlm.load` opens; `.final.results`, the test table).

    budget: the search's, in seconds or a duration such as "20m" or "1h30m" (the test evaluation follows).
    models: more candidate model paths; embedded=False tries those alone. Recipe keys the config or `overrides`
    set are kept as set (search_recipe=True: only those of `overrides`). data_curve=True then trains the
    winner's recipe on 25% and 50% of the rows (outside the budget)."""
    from tailorlm.auto.plan import parse_budget
    from tailorlm.auto.run import auto as run_auto
    from tailorlm.models.loading import quiet_library_logs

    seconds = parse_budget(budget) if isinstance(budget, str) else float(budget)
    if seconds <= 0:
        raise TailorError(f"tailorlm.auto(budget={budget!r}): must be more than zero")
    if quiet:
        quiet_library_logs()
    return run_auto(None if config is None else str(config), _override_list(overrides), seconds,
                    [str(m) for m in models], embedded, output, storage, trust_remote_code, data_curve,
                    search_recipe)


def pairs(source: str | Path, output: str | Path | None = None, limit: int | None = None) -> Path:
    """`tailor pairs`: preference pairs from the training split of a finished run (or a config), the model's
    wrong answers as rejected; returns the dpo.yaml that continues the run (tailorlm.run(it))."""
    from tailorlm.pipeline.pairs import make_pairs

    return make_pairs(str(source), Path(output) if output else None, limit).config


def load(run_dir: str | Path) -> Run:
    """A finished run directory, as a `Run` (its model is loaded when first used)."""
    RunDir(run_dir).require_complete("tailorlm.load", "loading it")
    return Run(Path(run_dir))


class Run:
    """A finished run: its metrics and files, and its trained model for prediction, generation and export."""

    def __init__(self, path: str | Path, *, _outcome=None, device: str = "auto"):
        self.dir = RunDir(path)
        self._outcome = _outcome
        self._device = device
        self._trained = None
        self._engine = None

    def __repr__(self) -> str:
        head = self.headline
        return f"Run({str(self.path)!r}" + (f", {head}" if head else "") + ")"

    @property
    def path(self) -> Path:
        return self.dir.path

    @property
    def metrics(self) -> dict:
        """metrics.json: every variant's test metrics, the best prompting result, the k-shot curve, training."""
        return self._outcome.metrics if self._outcome and self._outcome.metrics else self.dir.metrics()

    @property
    def config(self) -> RunConfig:
        return self.dir.config()

    @property
    def results(self):
        """Task name -> its test figures, typed (eval.results.TaskResults: variants, headline, fine_tuned,
        best_prompting, curve); a single-task run has one task, named after its preset."""
        from tailorlm.eval.results import TaskResults

        if self._outcome and self._outcome.results:
            return self._outcome.results.tasks
        return {name: TaskResults.from_json(section) for name, section in self.metrics.get("tasks", {}).items()}

    @property
    def headline(self) -> str:
        """One line: the fine-tuned headline metric against the best prompting result."""
        parts = []
        for name, task in self.results.items():
            tuned, best = task.fine_tuned, task.best_prompting or {}
            text = f"{name} {task.headline} {tuned:.3f}" if tuned is not None else ""
            if text and best.get("value") is not None:
                text += f" vs {best['value']:.3f} ({best['variant']})"
            parts.append(text)
        return "; ".join(p for p in parts if p)

    @property
    def report(self) -> Path:
        return self.dir / "report.md"

    @property
    def trained(self):
        """The trained model (models.trained.Trained): after tailorlm.run, the one this process trained, kept in
        memory rather than loaded a second time; after tailorlm.load, read from the run directory on first use."""
        if self._trained is None:
            fit = self._outcome.fit if self._outcome else None
            if fit is not None and fit.model is not None:
                from tailorlm.models.trained import Trained

                fit.model.eval()
                self._trained = Trained(fit.model, self._outcome.prepared.tokenizer, self.config, self.path,
                                        self._outcome.base_source, self.dir.weights(), self.dir.manifest())
            else:
                from tailorlm.ops.engines import load_for_inference

                self._trained, _ = load_for_inference(self.path, self._device)
        return self._trained

    @property
    def model(self):
        return self.trained.model

    @property
    def tokenizer(self):
        return self.trained.tokenizer

    def predict(self, rows: Any, *, task: str | None = None, batch_size: int | None = None,
                limit: int | None = None) -> list[dict]:
        """Predictions for rows: a data file path, a DataFrame, a list of dicts or a Dataset, read with the
        run's column mapping and template exactly as training read its data. One dict per row:
        {row, where, input, generated, predicted[, expected]} (expected when the rows carry answers)."""
        from tailorlm.serve.predict import predict_rows

        source = str(rows) if isinstance(rows, (str, Path)) else self._table(rows)
        device = next(self.model.parameters()).device
        lines, _ = predict_rows(self.trained, source, batch_size, limit, task, device)
        return lines

    def generate(self, prompt: str, *, max_new_tokens: int = 64, temperature: float = 0.0) -> str:
        """The model's answer to one prompt, laid out as in training (the run's chat format and system)."""
        return self.chat([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens,
                         temperature=temperature)

    def chat(self, messages: list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0) -> str:
        """The assistant's next message for an OpenAI-style message list."""
        from tailorlm.serve.jobs import Sampling

        engine = self._get_engine()
        return engine.complete(engine.chat_prompt(list(messages)), Sampling(max_new_tokens, temperature)).text

    def export(self, format: str = "gguf", *, quant: str | None = None, output: str | Path | None = None,
               verify: bool = False) -> Path:
        """Write an export (hf, adapter or gguf, as `tailor export`); returns its folder. verify=True loads it
        back and raises when its logits or prompts differ from the run's."""
        from tailorlm.ops.export import export_finished_run

        exported = export_finished_run(self.path, format, quant, output, verify=verify)
        checked = exported.checks
        if checked is not None and not checked.ok:
            raise TailorError(f"{exported.result.folder}: the export differs from the run: " + "; ".join(
                f"{c.name}: {c.value}" for c in checked.checks if not c.ok))
        return exported.result.folder

    def compare(self, *others: Run | str | Path):
        """This run beside others (track.compare.Comparison: config differences, metrics, curves)."""
        from tailorlm.ops.compare import compare

        return compare([self, *others])

    def close(self) -> None:
        """Stop the generation worker, if generate/chat started one."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _get_engine(self):
        if self._engine is None:
            from tailorlm.ops.engines import engine_for

            self._engine = engine_for(self.trained, next(self.model.parameters()).device)
        return self._engine

    def _table(self, rows: Any):
        from tailorlm.data.memory import memory_table

        return memory_table(rows, "rows")


def _config(config, overrides: list[str], trust_remote_code: bool, allow_code: bool = False) -> RunConfig:
    if isinstance(config, RunConfig):
        if not overrides:
            if allow_code:  # a config built in Python: the caller is its author
                config.objective._code_allowed = True
            return config
        config = config.model_dump(mode="json")
    if isinstance(config, Mapping):
        import yaml

        # One validation path for every kind of config: the YAML loader, with its messages.
        return load_config(None, overrides, trust_remote_code, text=yaml.safe_dump(dict(config), sort_keys=False),
                           source="<the config given to tailorlm.run>", allow_code=allow_code)
    return load_config(config, overrides, trust_remote_code=trust_remote_code, allow_code=allow_code)


def _override_list(overrides: Iterable[str] | Mapping) -> list[str]:
    if isinstance(overrides, Mapping):
        import json

        return [f"{key}={json.dumps(value) if not isinstance(value, str) else value}"
                for key, value in _by_setting(overrides).items()]
    return list(overrides)


def _by_setting(overrides: Mapping, prefix: str = "") -> dict:
    """{'train': {'lr': 1e-4}} as {'train.lr': 1e-4}: a dict given for a config section sets the settings it
    names and keeps the section's others, as dotted keys do; replacing the whole section would put every
    setting it leaves out back to its default, the config's own values dropped without a word. A dict for a
    setting whose value is itself a mapping (data.columns) stays that setting's value, as on the command line."""
    flat = {}
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and _is_section(dotted):
            flat.update(_by_setting(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _is_section(dotted: str) -> bool:
    model = RunConfig
    for part in dotted.split("."):
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return False  # an unknown key: left whole, for the config's validation to name
        model = field.annotation
    return isinstance(model, type) and hasattr(model, "model_fields")
