"""`tailor export --verify`: the exported model behaves as the model that was evaluated, on the run's own prompts.

1. logits: the export, loaded back by plain transformers (a GGUF through its GGUF loader), against the run's
   model, on a few of the run's test prompts exactly as training tokenized them;
2. chat template: the template the export carries, rendered by transformers (Jinja2) and tokenized by the
   exported tokenizer, gives the training prompt token for token;
3. Modelfile (GGUF): its TEMPLATE, rendered for system + prompt, gives the training prompt text;
4. llama.cpp (GGUF): the file run by llama.cpp itself continues each prompt greedily as the merged model does
   (export/llamacpp_check.py); skipped, not failed, where llama-cpp-python is not installed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tailorlm.export.build import ExportResult
from tailorlm.export.layout import PromptCase, training_prompts
from tailorlm.models.trained import Trained

# Logit tolerances, as max |exported - reference| over every position of the prompts, divided by the standard
# deviation of the reference logits (the scale on which a difference changes the model's choices). For scale,
# on SmolLM2-135M: a LoRA left unmerged after only 2 training steps moves logits by ~120% of that std, Q/K
# written without the rotary permutation by ~490%.
# f16 keeps 11 significant bits (relative rounding 2^-11, about 5e-4, per weight); the rounding of every matrix
# adds up through the layers, to 0.66% on SmolLM2-135M. 3% leaves room for longer prompts and deeper models.
F16_TOLERANCE = 0.03
# Q8_0 keeps 8 bits per weight with one scale per block of 32 (relative rounding up to 1/254 of the block's
# largest weight): 20% on SmolLM2-135M (the same figure as quantizing each matrix to Q8_0 and back in
# PyTorch; per position the median is 14%, and 97% of greedy next tokens agree). 40% leaves room for longer
# prompts yet stays well below what a missing merge or a misplaced tensor does.
Q8_0_TOLERANCE = 0.40
# The same float32 weights reloaded (hf folder, adapter on its base): only summation order can differ.
EXACT_TOLERANCE = 1e-4
TOLERANCES = {"f16": F16_TOLERANCE, "q8_0": Q8_0_TOLERANCE, None: EXACT_TOLERANCE}

# llama.cpp's greedy tokens against the merged model's, GREEDY_TOKENS per prompt. f16 rounding is far below
# a trained model's margins between its first and second choice: every prompt must agree token for token.
# Q8_0 moves logits by ~20% of their std (above), enough to flip a close choice, after which the two texts
# part ways: the share of tokens that agree before each prompt's first divergence must reach Q8_0_AGREEMENT.
# Measured with llama-cpp-python 0.3.36: SmolLM2-135M-Instruct, 10 chat prompts x 16 tokens, f16 10/10
# prompts identical, q8_0 5/10 prompts and 72% of tokens; the tiny random models of every family
# (tests/family_models.py, 3 prompts x 8 tokens) f16 all identical, q8_0 71% to 100% of tokens. 50% leaves
# room for the few prompts a check runs on, while a wrong file agrees on next to nothing.
GREEDY_TOKENS = 8
F16_AGREEMENT = 1.0
Q8_0_AGREEMENT = 0.5
AGREEMENT = {"f16": F16_AGREEMENT, "q8_0": Q8_0_AGREEMENT}


@dataclass
class Check:
    name: str
    result: str
    limit: str
    ok: bool


@dataclass
class VerifyReport:
    checks: list[Check] = field(default_factory=list)
    figures: dict = field(default_factory=dict)  # measured numbers, for tests and reports

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def show(self) -> None:
        from rich.table import Table

        from tailorlm.ui import console

        table = Table(title="export checks")
        for column in ("check", "result", "limit", ""):
            table.add_column(column)
        for c in self.checks:
            table.add_row(c.name, c.result, c.limit, "[green]ok[/]" if c.ok else "[bold red]FAIL[/]")
        console.print(table)


def verify_export(trained: Trained, result: ExportResult, cases: list[PromptCase] | None = None) -> VerifyReport:
    """Load the export back and run the checks; `trained` is the loaded run the export was written from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cases = cases or training_prompts(trained)
    device = next(trained.model.parameters()).device
    report = VerifyReport()
    folder = str(result.folder)
    if result.format == "gguf":
        name = result.gguf_file.name
        config = _gguf_config(folder, name, trained.model.config)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        what = f"GGUF {result.quant} logits vs merged model"
    elif result.format == "hf":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        what = "hf folder logits vs merged model"
    else:
        from peft import PeftModel

        from tailorlm.models.loading import load_model

        base = load_model(trained.cfg.model, device, trained.tokenizer).model
        model = PeftModel.from_pretrained(base, folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        what = "adapter on its base vs the run"
    model.to(device).eval()
    report.checks.append(_logits_check(report, what, trained.model, model, cases, TOLERANCES[result.quant]))
    report.checks.append(_template_check(report, tokenizer, result.layout.uses_chat, cases))
    if result.modelfile is not None and all(case.user is not None for case in cases):  # one prompt per case
        report.checks.append(_modelfile_check(report, result.modelfile.read_text(), cases))
    if result.format == "gguf":
        report.checks.append(llama_cpp_check(report, trained.model, result.gguf_file, result.quant, cases))
    return report


# Hyperparameters transformers' GGUF reader does not read from the file but fills from its defaults; llama.cpp
# derives both from the head size the file records (attention.key_length), which the tiny models of the tests
# and some real ones (Gemma 3 27B's scalar) set apart from those defaults.
READER_DEFAULTS = ("head_dim", "query_pre_attn_scalar")


def _gguf_config(folder: str, name: str, run_config):
    """The config transformers reads from the GGUF, with the run's own values for READER_DEFAULTS.

    Only those: any other hyperparameter the file gets wrong (rope theta, norm epsilon, window) must still make
    this check fail, since it is read from the file's metadata."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    for key in READER_DEFAULTS:
        if hasattr(config, key) and getattr(run_config, key, None) is not None:
            setattr(config, key, getattr(run_config, key))
    return config


def llama_cpp_check(report, model, gguf_file, quant: str, cases) -> Check:
    """The GGUF run by llama.cpp: greedy tokens against the merged model's (f16: all prompts identical)."""
    from tailorlm.export.llamacpp_check import greedy_agreement

    agreement = greedy_agreement(model, gguf_file, [case.ids for case in cases], GREEDY_TOKENS)
    name = f"llama.cpp greedy tokens ({quant}) vs merged model"
    if agreement.skipped:
        report.figures["llama_cpp_skipped"] = agreement.skipped
        return Check(name, f"skipped: {agreement.skipped}", "", True)
    report.figures.update(llama_cpp_prompts_identical=agreement.prompts_identical,
                          llama_cpp_token_share=agreement.token_share)
    result = (f"{agreement.prompts_identical}/{len(cases)} prompts identical, "
              f"{agreement.token_share:.0%} of tokens before a divergence")
    if quant == "f16":
        return Check(name, result, "all prompts", agreement.prompts_identical == len(cases))
    return Check(name, result, f"{AGREEMENT[quant]:.0%} of tokens", agreement.token_share >= AGREEMENT[quant])


def logit_difference(reference: torch.nn.Module, exported: torch.nn.Module,
                     cases: list[PromptCase]) -> tuple[float, float]:
    """(max |difference|, that divided by the reference logits' std), over every position of every prompt."""
    worst_abs, worst_rel = 0.0, 0.0
    device = next(reference.parameters()).device
    with torch.no_grad():
        for case in cases:
            ids = torch.tensor([case.ids], device=device)
            expected = reference(ids).logits.float()
            diff = (exported(ids).logits.float() - expected).abs().max().item()
            worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / expected.std().item())
    return worst_abs, worst_rel


def _logits_check(report, name, reference, exported, cases, tolerance) -> Check:
    worst_abs, worst_rel = logit_difference(reference, exported, cases)
    report.figures.update(logits_max_abs_diff=worst_abs, logits_rel_diff=worst_rel)
    return Check(name, f"max |diff| {worst_abs:.2e} = {worst_rel:.2%} of logit std", f"{tolerance:.2%}",
                 worst_rel <= tolerance)


def _template_check(report, tokenizer, uses_chat: bool, cases) -> Check:
    """The exported chat template, rendered by transformers, tokenized by the exported tokenizer."""
    same = 0
    for case in cases:
        text = tokenizer.apply_chat_template(case.messages, tokenize=False, add_generation_prompt=True,
                                             **({"tools": case.tools} if case.tools else {}))
        # as ChatFormat.encode_prompt: a chat template writes its own special tokens
        same += tokenizer(text, add_special_tokens=not uses_chat)["input_ids"] == case.ids
    report.figures["template_identical"] = same
    return Check("exported chat template = training prompt tokens", f"{same}/{len(cases)} prompts identical",
                 "all", same == len(cases))


def _modelfile_check(report, modelfile: str, cases) -> Check:
    from tailorlm.export.modelfile import read_modelfile, render_template

    values = read_modelfile(modelfile)
    same = sum(render_template(values.get("template", ""), {"System": values.get("system", ""), "Prompt": case.user})
               == case.text for case in cases)
    report.figures["modelfile_identical"] = same
    return Check("Modelfile TEMPLATE = training prompt text", f"{same}/{len(cases)} prompts identical", "all",
                 same == len(cases))
