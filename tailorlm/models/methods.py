"""Fine-tuning methods as strategies of the one training loop.

A strategy decides which parameters train and when, at which learning rate each group trains, what a
checkpoint must hold, and how the result is saved. The loop itself never branches on the method.
"""
from __future__ import annotations

import fnmatch
import math
from pathlib import Path

import torch

from tailorlm.config import MethodSpec
from tailorlm.errors import TailorError
from tailorlm.models.layers import BOTTOM, describe_group, parameter_depths, top_down_groups


class Strategy:
    name = "base"

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Return the model to train, with requires_grad set on exactly the parameters that train at step 0."""
        raise NotImplementedError

    def save(self, model: torch.nn.Module, tokenizer, out_dir: Path) -> Path:
        raise NotImplementedError

    def plan(self, total_steps: int, steps_per_epoch: int) -> None:
        """Told the run's length before the first step, so schedules can be laid out."""

    def on_step(self, step: int, model: torch.nn.Module) -> str | None:
        """Called before each optimizer step (also on resume); returns a log line when what trains changes."""
        return None

    def param_groups(self, model: torch.nn.Module, lr: float) -> list[dict]:
        """Optimizer groups. Parameters that start frozen may be listed: AdamW skips a parameter until it has
        a gradient, so a group unfrozen later starts its moments at that step, and the optimizer (and its
        checkpoint) keeps one layout for the whole run."""
        return [{"params": self.trainable(model), "lr": lr}]

    def checkpoint_params(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """Every parameter this method can change; a checkpoint saves exactly these."""
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    @staticmethod
    def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]


class FullFineTune(Strategy):
    name = "full"

    def prepare(self, model):
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def save(self, model, tokenizer, out_dir):
        target = out_dir / "model"
        model.save_pretrained(target, safe_serialization=True)
        tokenizer.save_pretrained(target)
        return target


class Freeze(FullFineTune):
    """Full fine-tuning of everything but the embeddings and first blocks, and/or parameters by name."""

    name = "freeze"

    def __init__(self, spec: MethodSpec):
        self.spec = spec.freeze

    def prepare(self, model):
        depths = parameter_depths(model)
        frozen = 0
        for name, p in model.named_parameters():
            low = depths[name] == BOTTOM or 0 <= depths[name] < self.spec.first_blocks
            matched = any(fnmatch.fnmatch(name, pattern) for pattern in self.spec.patterns)
            p.requires_grad_(not ((self.spec.first_blocks and low) or matched))
            frozen += not p.requires_grad
        if not frozen:
            raise TailorError("method.freeze froze nothing: set method.freeze.first_blocks or a pattern that "
                              "matches parameter names (e.g. '*.layers.0.*')")
        return model


class GradualUnfreeze(FullFineTune):
    """ULMFiT-style: the top group (head, final norm, last blocks) trains first; each later stage unfreezes
    the next group down, until the embeddings train too. Optional discriminative rates per group."""

    name = "gradual_unfreeze"

    def __init__(self, spec: MethodSpec):
        self.spec = spec.unfreeze
        self.groups: list[list[str]] = []
        self.labels: list[str] = []
        self.every_steps = 1
        self.stage = -1

    def prepare(self, model):
        self.groups = top_down_groups(model, self.spec.groups)
        depths = parameter_depths(model)
        self.labels = [describe_group(g, depths) for g in self.groups]
        self._apply(model, 0)
        self.stage = -1  # so the first step logs what trains
        return model

    def plan(self, total_steps, steps_per_epoch):
        if self.spec.every is not None:
            unit = steps_per_epoch if self.spec.unit == "epoch" else 1
            self.every_steps = self.spec.every * unit
        else:  # spread the stages evenly: the last group joins at (n-1)/n of the run
            self.every_steps = max(1, math.ceil(total_steps / len(self.groups)))

    def stage_at(self, step: int) -> int:
        return min(len(self.groups) - 1, step // self.every_steps)

    def on_step(self, step, model):
        stage = self.stage_at(step)
        if stage == self.stage:
            return None
        self._apply(model, stage)
        return f"step {step + 1}: training " + "; ".join(self.labels[: stage + 1])

    def _apply(self, model, stage: int) -> None:
        live = {n for g in self.groups[: stage + 1] for n in g}
        for name, p in model.named_parameters():
            p.requires_grad_(name in live)
        self.stage = stage

    def param_groups(self, model, lr):
        params = dict(model.named_parameters())
        return [{"params": [params[n] for n in names], "lr": lr * self.spec.lr_decay ** g, "name": self.labels[g]}
                for g, names in enumerate(self.groups)]

    def checkpoint_params(self, model):
        names = {n for g in self.groups for n in g}
        return {n: p for n, p in model.named_parameters() if n in names}


class Lora(Strategy):
    """LoRA through PEFT, so the adapter files are the standard PEFT format any PEFT user can load.
    DoRA and rsLoRA are PEFT options of the same adapter (method.lora.use_dora / use_rslora)."""

    name = "lora"

    def __init__(self, spec: MethodSpec):
        self.spec = spec.lora

    def prepare(self, model):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(task_type="CAUSAL_LM", r=self.spec.r, lora_alpha=self.spec.alpha,
                            lora_dropout=self.spec.dropout, target_modules=self.spec.target_modules,
                            use_dora=self.spec.use_dora, use_rslora=self.spec.use_rslora)
        return get_peft_model(model, config)

    def save(self, model, tokenizer, out_dir):
        target = out_dir / "adapter"
        model.save_pretrained(target)  # adapter_config.json + adapter_model.safetensors
        tokenizer.save_pretrained(target)
        return target


class QLora(Lora):
    """LoRA over a 4-bit NF4 base (loaded quantized by models/loading.py); adapters and their gradients stay
    in higher precision. PEFT's k-bit preparation casts norms to fp32 and keeps inputs differentiable."""

    name = "qlora"

    def prepare(self, model):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return super().prepare(model)


def check_supported(spec: MethodSpec, device: torch.device) -> None:
    """Fail before any output is written when the method cannot run on this machine."""
    if spec.name == "qlora":
        if device.type != "cuda":
            raise TailorError("method.name=qlora needs a CUDA GPU (the 4-bit NF4 base runs on bitsandbytes' CUDA "
                              "kernels); this machine has none: use method.name=lora, which trains the same adapter "
                              "over unquantized weights")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise TailorError("method.name=qlora needs bitsandbytes: pip install bitsandbytes") from None


def make_strategy(spec: MethodSpec) -> Strategy:
    return {"full": lambda: FullFineTune(), "lora": lambda: Lora(spec), "qlora": lambda: QLora(spec),
            "freeze": lambda: Freeze(spec), "gradual_unfreeze": lambda: GradualUnfreeze(spec)}[spec.name]()
