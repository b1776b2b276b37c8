"""The space file: which config keys a sweep varies, over what ranges, and how the search runs.

    n_trials: 20
    metric: accuracy                   # default: eval.select.metric when the config sets it, else the task's headline
    pruner: median                     # or none, or {name: median, n_startup_trials: 5, n_warmup_steps: 0}
    params:
      train.lr: {type: log-float, low: 1.0e-5, high: 1.0e-3}
      train.epochs: {type: int, low: 1, high: 3}
      method.lora.r: [8, 16, 32]       # a list is a categorical choice
      method.lora.alpha: 2r            # a scalar is fixed; 'Nr' is N times the trial's lora r
      method.lora.target_modules: [all-linear, [q_proj, v_proj]]

Every key of `params` is a dotted run-config key; each is checked by applying its bounds or choices to the base
config with load_config, so a sweep fails before its first trial, not in its tenth.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    ValidationError,
    model_validator,
)

from tailorlm.config import RunConfig, line_of, load_config
from tailorlm.errors import ConfigError, did_you_mean

# 'alpha: 2r' ties LoRA's alpha to the trial's rank, so the update's scale (alpha / r) stays put while r varies.
RATIO_OF = {"method.lora.alpha": "method.lora.r"}
RATIO = re.compile(r"^(\d+(?:\.\d+)?)?r$")


class SpaceError(ConfigError):
    def __init__(self, source: str, problems: list[str]):
        super().__init__(source, problems)
        self.args = (f"{source}: {len(problems)} problem(s) in the sweep space:\n" + "\n".join(f"  - {p}" for p in problems),)


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FloatParam(Spec):
    type: Literal["float", "log-float"] = Field(description="float: uniform; log-float: uniform in log space (learning rates)")
    low: float
    high: float
    step: float | None = Field(None, gt=0, description="Discretise a float range (not with log-float)")

    @model_validator(mode="after")
    def _check(self):
        _check_range(self.low, self.high)
        if self.type == "log-float" and self.low <= 0:
            raise ValueError(f"a log-float range needs low > 0 (got {self.low})")
        if self.type == "log-float" and self.step is not None:
            raise ValueError("step does not combine with log-float")
        return self

    def suggest(self, trial, name: str):
        if self.type == "log-float":
            return trial.suggest_float(name, self.low, self.high, log=True)
        return trial.suggest_float(name, self.low, self.high, step=self.step)

    def examples(self) -> list:
        return [self.low, self.high]


class IntParam(Spec):
    type: Literal["int"]
    low: int
    high: int
    step: PositiveInt = 1

    @model_validator(mode="after")
    def _check(self):
        _check_range(self.low, self.high)
        return self

    def suggest(self, trial, name: str):
        return trial.suggest_int(name, self.low, self.high, step=self.step)

    def examples(self) -> list:
        return [self.low, self.high]


class ChoiceParam(Spec):
    type: Literal["categorical"] = "categorical"
    choices: list[Any] = Field(min_length=1, description="Values to choose from; lists and mappings are allowed")

    @model_validator(mode="after")
    def _check(self):
        labels = [label_of(c) for c in self.choices]
        repeated = sorted({lab for lab in labels if labels.count(lab) > 1})
        if repeated:
            raise ValueError(f"choices repeat: {', '.join(repeated)}")
        return self

    def suggest(self, trial, name: str):
        # Optuna stores only scalars, so a list choice ('[q_proj, v_proj]') is stored as its YAML text.
        by_label = {label_of(c): c for c in self.choices}
        return by_label[trial.suggest_categorical(name, list(by_label))]

    def examples(self) -> list:
        return list(self.choices)


class FixedParam(Spec):
    type: Literal["fixed"]
    value: Any

    def suggest(self, trial, name: str):
        return self.value

    def examples(self) -> list:
        return [self.value]


Param = Annotated[FloatParam | IntParam | ChoiceParam | FixedParam, Field(discriminator="type")]
TAGS = {"float", "log-float", "int", "categorical", "fixed"}


class PrunerSpec(Spec):
    name: Literal["median", "percentile", "threshold", "none"] = Field(
        "median", description="Stop a trial whose metric falls behind other trials' at the same step (median, "
                              "percentile) or crosses a bound (threshold); none: every trial runs to the end")
    n_startup_trials: NonNegativeInt = Field(5, description="Trials that finish before pruning starts (median, percentile)")
    n_warmup_steps: NonNegativeInt = Field(0, description="Training steps of a trial before it may be pruned")
    percentile: float | None = Field(None, gt=0, lt=100, description="percentile: prune below this percentile")
    lower: float | None = Field(None, description="threshold: prune when the metric falls below")
    upper: float | None = Field(None, description="threshold: prune when the metric rises above")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value):
        return {"name": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self):
        if (self.name == "percentile") != (self.percentile is not None):
            raise ValueError("percentile is required by, and only used with, name: percentile")
        if (self.name == "threshold") != (self.lower is not None or self.upper is not None):
            raise ValueError("lower/upper are required by, and only used with, name: threshold")
        return self


class SweepSpec(Spec):
    n_trials: PositiveInt = Field(20, description="Trials in the study in total, across runs and workers")
    metric: str | None = Field(None, description="Validation metric to optimise; eval.select.metric when the "
                                                    "config sets it, else the task's headline (e.g. accuracy)")
    direction: Literal["minimize", "maximize"] | None = Field(None, description="By default loss/perplexity minimise, anything else maximises")
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = Field(42, description="Sampler seed; trial N samples with seed + N, so workers and resumed sweeps never repeat a trial's draw")
    pruner: PrunerSpec = PrunerSpec()
    storage: str | None = Field(None, description="Optuna storage URL; sqlite:///<sweep dir>/study.db when absent")
    study: str | None = Field(None, description="Study name; the config's output.name when absent")
    params: dict[str, Param] = Field(min_length=1, description="Dotted config key -> range, choices or fixed value")

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, raw):
        if isinstance(raw, dict) and isinstance(raw.get("params"), dict):
            raw = {**raw, "params": {k: _expand(v) for k, v in raw["params"].items()}}
        return raw

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _expand(value):
    """The short forms: a list is a categorical choice, a plain value is fixed, {choices: ...} needs no type."""
    if isinstance(value, list):
        return {"type": "categorical", "choices": value}
    if isinstance(value, dict):
        return {"type": "categorical", **value} if "type" not in value and "choices" in value else value
    return {"type": "fixed", "value": value}


def _check_range(low, high) -> None:
    if low >= high:
        raise ValueError(f"low ({low}) must be below high ({high})")


def label_of(value) -> str | int | float | bool | None:
    """How Optuna records a choice: scalars as they are, lists and mappings as one-line YAML."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return yaml_scalar(value)


def yaml_scalar(value) -> str:
    """One-line YAML for a key=value override, read back by config.parse_override to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("\n...")


def load_space(path: str | Path) -> SweepSpec:
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
        root, raw = yaml.compose(text), yaml.safe_load(text)
    except FileNotFoundError:
        raise SpaceError(source, ["file not found"]) from None
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise SpaceError(source, [f"not a readable YAML file: {e}"]) from None
    if not isinstance(raw, dict):
        raise SpaceError(source, ["the top level must be a mapping (n_trials, metric, ..., params)"])
    try:
        return SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise SpaceError(source, [_problem(err, root) for err in e.errors()]) from None


def _problem(err: dict, root) -> str:
    loc = tuple(str(p) for p in err["loc"])
    if loc[:1] == ("params",) and len(loc) > 2 and loc[2] in TAGS:
        loc = loc[:2] + loc[3:]  # drop the union's tag: it is not a key in the file
    if err["type"] == "extra_forbidden":
        allowed = {1: list(SweepSpec.model_fields), 2: list(PrunerSpec.model_fields)}.get(
            len(loc), [f for model in (FloatParam, ChoiceParam, FixedParam) for f in model.model_fields])
        message = "unknown key" + did_you_mean(loc[-1], allowed)
    elif err["type"] in ("union_tag_not_found", "union_tag_invalid"):
        message = (f"type must be one of {', '.join(sorted(TAGS))}" + (f" (got {err['input'].get('type')!r})"
                   if err["type"] == "union_tag_invalid" else "; a list is a choice, a plain value is fixed"))
    else:
        message = err["msg"].removeprefix("Value error, ")
    return f"{'.'.join(loc)}{line_of(root, loc)}: {message}"


def default_space(cfg: RunConfig) -> SweepSpec:
    """Used when no --space is given: the learning rate around the method's default, and LoRA's rank."""
    params: dict[str, Any] = {"train.lr": {"type": "log-float", "low": cfg.lr / 10, "high": cfg.lr * 10}}
    if cfg.method.name in ("lora", "qlora"):
        params.update({"method.lora.r": [8, 16, 32], "method.lora.alpha": "2r"})
    if cfg.method.name == "gradual_unfreeze":
        params["method.unfreeze.lr_decay"] = {"type": "float", "low": 0.3, "high": 1.0}
    return SweepSpec.model_validate({"params": params})


def resolve(values: dict[str, Any], base: RunConfig) -> dict[str, Any]:
    """Turn ratio values ('2r') into numbers, from the trial's own rank or else the base config's."""
    resolved = dict(values)
    for key, of in RATIO_OF.items():
        match = RATIO.match(str(values.get(key, "")))
        if match:
            factor = float(match.group(1) or 1)
            resolved[key] = factor * (values[of] if of in values else _get(base, of))
    return resolved


def overrides(values: dict[str, Any]) -> list[str]:
    return [f"{key}={yaml_scalar(value)}" for key, value in values.items()]


def _get(cfg: RunConfig, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def check_against_config(space: SweepSpec, space_path: str, config_path: str | None, base: RunConfig) -> None:
    """Apply every bound and choice to the base config, so an unknown key or a value the config refuses (r: 0)
    is reported now, with the space file's line, the same way `tailor run key=value` would report it."""
    root = yaml.compose(Path(space_path).read_text(encoding="utf-8")) if space_path else None
    problems = []
    for key, param in space.params.items():
        for example in param.examples():
            value = resolve({key: example}, base)[key]
            shown = f"{example!r}" + (f" (= {value!r})" if value != example else "")
            try:
                load_config(config_path, overrides({key: value}), trust_remote_code=base.model.trust_remote_code)
            except ConfigError as e:
                where = line_of(root, ("params", key)) if root else ""
                for problem in e.problems:
                    problem = problem.removeprefix(f"{key}: ")
                    problems.append(f"params.{key}{where}: {'' if 'unknown key' in problem else f'{shown}: '}{problem}")
                if any("unknown key" in p for p in e.problems):
                    break  # one report per unknown key, not one per value
    if problems:
        raise SpaceError(space_path or "default space", list(dict.fromkeys(problems)))
