"""Nested config <-> dotted keys: one flat view shared by MLflow params, TensorBoard hparams and `tailor compare`."""
from __future__ import annotations

import json
from typing import Any


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}. Lists of sections (multi-task `tasks`) get their index
    in the key ('tasks.0.data.train'), so two runs' task lists compare entry by entry; lists of plain values
    stay whole, and an empty list or mapping is kept as a value so its absence still shows up in a diff."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, dotted + "."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for i, item in enumerate(value):
                flat.update(flatten(item, f"{dotted}.{i}."))
        else:
            flat[dotted] = value
    return flat


def as_text(value: Any) -> str:
    """A parameter value as the text trackers store: strings as they are, everything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
