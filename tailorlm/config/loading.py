"""YAML in, typed objects out: a run spec file (or text) with key=value overrides, validated at once.

Unknown keys and bad values are all collected and reported together, each with its dotted path and, when it
came from a YAML file, the line it sits on.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tailorlm.config.sections import DEFAULT_CONFIG, RunConfig
from tailorlm.errors import ConfigError, did_you_mean


def load_config(path: str | Path | None = None, overrides: list[str] = (), trust_remote_code: bool = False,
                text: str | None = None, source: str | None = None, allow_code: bool = False,
                read_only: bool = False) -> RunConfig:
    """Read a YAML run spec (the embedded default when path and text are None), apply key=value overrides,
    validate. `text` is a spec given as YAML text (the Python API's dicts); `source` names it in errors.

    trust_remote_code=True is the caller saying, on this command, that the model's own Python may run; a config
    (a file anyone may have written, such as a downloaded run folder's config.yaml) that asks for it without
    that is refused. allow_code=True says the same of Python the config names itself (a GRPO reward function);
    read_only=True reads a finished run's config to use its model or settings, which runs none of that code
    (it stays not allowed), so it is not refused either."""
    if text is not None:
        source = source or "<config text>"
    elif path is None:
        source = f"<default: {DEFAULT_CONFIG}>"
        text = resources.files("tailorlm.defaults").joinpath(DEFAULT_CONFIG).read_text()
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(source, ["file not found"]) from None
        except UnicodeDecodeError as e:
            raise ConfigError(source, [f"not UTF-8 text ({e.reason} at byte {e.start})"]) from None
    try:
        root = yaml.compose(text)
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(source, [f"invalid YAML: {e}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError(source, ["the top level must be a mapping of sections (model, data, ...)"])
    overridden = set()
    for item in overrides:
        dotted, value = parse_override(item)
        _set_dotted(raw, dotted, value)
        overridden.add(tuple(dotted.split(".")))
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(str(p) for p in err["loc"])
            where = "" if any(loc[: i + 1] in overridden for i in range(len(loc))) else line_of(root, loc)
            problems.append(f"{'.'.join(loc)}{where}: {_describe(err, loc)}")
        raise ConfigError(source, problems) from None
    if cfg.model.trust_remote_code and not trust_remote_code:
        key = ("model", "trust_remote_code")
        where = "" if key in overridden else line_of(root, key)
        who = "a key=value override" if key in overridden else "a config file"
        raise ConfigError(source, [f"model.trust_remote_code{where}: asks to run Python code shipped with the model "
                                   f"({cfg.model.path}), which {who} cannot allow by itself. If you trust that "
                                   f"code, add --trust-remote-code to the command (trust_remote_code=True in "
                                   f"Python)"])
    cfg.model.trust_remote_code = trust_remote_code
    for i, term in enumerate(cfg.objective.grpo.reward):
        if term.function is not None and not allow_code and not read_only:
            key = ("objective", "grpo", "reward", str(i), "function")
            where = "" if any(key[:n] in overridden for n in range(3, 6)) else line_of(root, key)
            raise ConfigError(source, [f"objective.grpo.reward[{i}].function{where}: {term.function} is Python code, "
                                       f"which a config cannot run by itself. If you trust that code, add "
                                       f"--allow-code to the command (allow_code=True in Python)"])
    cfg.objective._code_allowed = allow_code
    for spec in [cfg.template] + [t.template for t in cfg.tasks]:
        spec._source = source
    if path is not None and cfg.output.name == "run":
        cfg.output.name = Path(path).stem
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """'train.lr=1e-4' -> ('train.lr', 0.0001); values are read as YAML scalars or lists."""
    if "=" not in item:
        raise ConfigError("command line", [f"'{item}' is not a key=value override"])
    key, _, value = item.partition("=")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def _describe(err: dict, loc: tuple[str, ...]) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown key" + did_you_mean(loc[-1], _fields_at(loc[:-1]))
    value = err.get("input")
    shown = f" (got {value!r})" if value is not None and not isinstance(value, dict) else ""
    return f"{err['msg']}{shown}"


def _fields_at(loc: tuple[str, ...]) -> list[str]:
    """The allowed keys of the section at loc, for 'did you mean' hints."""
    model: Any = RunConfig
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def line_of(root: yaml.Node | None, loc: tuple[str, ...]) -> str:
    """' (line N)' of the deepest YAML node on loc's path, so users can jump to the problem."""
    node, line = root, None
    for part in loc:
        if isinstance(node, yaml.SequenceNode) and str(part).isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]  # a list's item: its own line
            line = node.start_mark.line + 1
            continue
        if not isinstance(node, yaml.MappingNode):
            break
        for key, value in node.value:
            if key.value == part:
                line, node = key.start_mark.line + 1, value
                break
        else:
            break
    return f" (line {line})" if line else ""
