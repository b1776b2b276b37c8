"""Hugging Face exports: the merged model as a plain transformers folder, or the PEFT adapter alone.

Both carry the tokenizer with the run's prompt layout as its chat template, so `apply_chat_template` renders
the prompt the model was trained on, and generation stops at the end-of-turn token training taught.
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from tailorlm.errors import TailorError
from tailorlm.export.layout import Layout
from tailorlm.models.loading import DEFAULT_MODEL, locate
from tailorlm.models.trained import Trained

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def save_tokenizer(tokenizer, layout: Layout, out: Path) -> None:
    tokenizer = copy.deepcopy(tokenizer)  # the caller's tokenizer keeps its own template
    tokenizer.chat_template = layout.chat_template
    tokenizer.save_pretrained(out)


def write_hf(trained: Trained, layout: Layout, out: Path) -> None:
    """The merged model (LoRA folded in by load_trained(merge=True)) as safetensors + config + tokenizer."""
    from transformers import GenerationConfig

    if hasattr(trained.model, "peft_config"):
        raise TailorError("internal: write_hf needs the merged model (load_trained(..., merge=True))")
    trained.model.save_pretrained(out, safe_serialization=True)
    save_tokenizer(trained.tokenizer, layout, out)
    tokenizer = trained.tokenizer
    # Greedy, as the model was evaluated; eos is the end-of-turn token training taught the model to emit.
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=layout.end_of_turn_id,
                     pad_token_id=tokenizer.pad_token_id, do_sample=False).save_pretrained(out)


def write_adapter(trained: Trained, layout: Layout, out: Path) -> None:
    """The run's PEFT adapter files, the tokenizer, and a record of the exact base model they apply to."""
    for name in ADAPTER_FILES:
        shutil.copy2(trained.weights / name, out / name)
    base = base_record(trained)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base["folder"]
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "tailorlm_base.json").write_text(json.dumps(base, indent=2) + "\n")
    save_tokenizer(trained.tokenizer, layout, out)
    (out / "README.md").write_text(model_card(trained, base, layout))


def base_record(trained: Trained) -> dict:
    """Where the base model comes from: the folder (and GGUF file) it was loaded from, the package for the
    embedded default. The adapter was trained on exactly these weights (dequantized, for a GGUF)."""
    folder, gguf_file = locate(trained.cfg.model.path)
    record = {"model_path": trained.cfg.model.path, "folder": str(Path(folder).resolve()) if Path(folder).exists()
              else folder, "gguf_file": gguf_file, "source": trained.base_source, "dtype": trained.cfg.model.dtype}
    if trained.cfg.model.path == "default":
        from importlib.metadata import PackageNotFoundError, version

        package = DEFAULT_MODEL[0].replace("_", "-")
        try:
            record["package"] = f"{package}=={version(package)}"
        except PackageNotFoundError:
            record["package"] = package
    return record


def model_card(trained: Trained, base: dict, layout: Layout) -> str:
    gguf_arg = f', gguf_file="{base["gguf_file"]}"' if base["gguf_file"] else ""
    origin = f"`{base['source']}`" + (f" (from the PyPI package `{base['package']}`)" if "package" in base else "")
    dequantized = " (the GGUF dequantized on load)" if base["gguf_file"] else ""
    system = [{"role": "system", "content": layout.system}] if layout.system and layout.uses_chat else []
    plain = "" if layout.uses_chat else " (the plain 'Answer:' layout)"
    messages = json.dumps(system + [{"role": "user", "content": "..."}], ensure_ascii=False)
    return f"""# LoRA adapter trained with tailorlm

Run: `{trained.run_dir}` ({trained.cfg.template.preset} task, method {trained.method}).
Base model: {origin}. `tailorlm_base.json` records it; the adapter was trained on exactly those
weights{dequantized}.

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base['folder']}"{gguf_arg})
model = PeftModel.from_pretrained(base, "path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
prompt = tokenizer.apply_chat_template({messages}, tokenize=False, add_generation_prompt=True)
inputs = tokenizer(prompt, add_special_tokens={not layout.uses_chat}, return_tensors="pt")
output = model.generate(**inputs, do_sample=False, eos_token_id={layout.end_of_turn_id}, max_new_tokens=64)
```

The tokenizer's chat template is the prompt layout used in training{plain};
the model was evaluated greedily and ends its answer with `{layout.end_of_turn}`.
"""
