"""Fine-tuning methods as strategies of the one training loop.

A strategy decides which parameters train (and, for later methods, when), and how the result is saved.
The loop itself never branches on the method.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tailorlm.config import MethodSpec


class Strategy:
    name = "base"

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """Return the model to train, with requires_grad set on exactly the parameters that train."""
        raise NotImplementedError

    def save(self, model: torch.nn.Module, tokenizer, out_dir: Path) -> Path:
        raise NotImplementedError

    def on_step(self, step: int, model: torch.nn.Module) -> None:
        """Called before each optimizer step; schedules such as gradual unfreezing hook in here."""

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


class Lora(Strategy):
    """LoRA through PEFT, so the adapter files are the standard PEFT format any PEFT user can load."""

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


def make_strategy(spec: MethodSpec) -> Strategy:
    return {"full": lambda: FullFineTune(), "lora": lambda: Lora(spec)}[spec.name]()
