"""The objective section of the run spec: what the loss is (SFT, the preference objectives, GRPO) and its
settings. GRPO's rewards are the task's own metrics by default, so learning from them needs no code; a reward
written in Python is code, which only the command line can allow (load_config's allow_code)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, PositiveInt, PrivateAttr, field_validator, model_validator

from tailorlm.config.section import Section

# Preference objectives start from a model that already answers well (often an SFT run) and only shift which
# of two answers it prefers; the usual rates are an order of magnitude below SFT's (TRL's DPO examples, the
# Zephyr recipe), so they train at a tenth of the method's rate unless train.lr says otherwise. GRPO too: it
# nudges a model that already answers towards better answers (TRL's GRPO default is 1e-6 for full weights).
PREFERENCE_LR_SCALE = 0.1
# Each objective's usual strength: DPO/KTO's beta (how far from the reference), ORPO's lambda (weight of the
# odds-ratio term), SimPO's beta (the scale of its length-normalised reward), GRPO's KL weight (0, as in
# Dr. GRPO and DAPO: the clipped ratio alone keeps each update near the sampling policy).
DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0, "grpo": 0.0}
PREFERENCE_OBJECTIVES = ("dpo", "orpo", "simpo", "kto")


class RewardTerm(Section):
    """One part of GRPO's reward, scored on each sampled answer: a task metric against the example's reference
    ({metric: f1, weight: 1}), whether the answer parses ({format: 0.2}: that weight), or a Python function
    ({function: path/to/file.py:name}, run only with --allow-code)."""
    metric: Optional[str] = Field(None, description="A metric of the task's own (accuracy, f1, exact_match, chrf, "
                                                    "rouge_l ...), of one answer against its reference")
    format: Optional[float] = Field(None, description="Weight of the format reward: 1 when the answer parses (a label "
                                                      "of the set; an open answer that ended), else 0")
    function: Optional[str] = Field(None, description="FILE.py:NAME, called as NAME(completion, example) -> float "
                                                      "for each answer; Python code, so only with --allow-code")
    weight: float = Field(1.0, description="Weight of a metric or function term in the summed reward")

    @model_validator(mode="after")
    def _one_kind(self):
        kinds = [k for k in ("metric", "format", "function") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"a reward term names exactly one of metric, format or function (got "
                             f"{', '.join(kinds) or 'none'})")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"function {self.function!r}: write it FILE.py:NAME")
        if self.format is not None and "weight" in self.model_fields_set:
            raise ValueError("a format term's weight is its value: {format: 0.2}")
        return self

    @property
    def label(self) -> str:
        """How logs name this term: reward/<label>."""
        if self.metric is not None:
            return self.metric
        return "format" if self.format is not None else self.function.rsplit(":", 1)[-1]

    @property
    def scale(self) -> float:
        return self.format if self.format is not None else self.weight


class GRPOSpec(Section):
    group_size: int = Field(8, ge=2, description="Answers sampled per prompt; each is scored against the group's "
                                                 "mean (a group whose answers all score the same teaches nothing)")
    loss: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "grpo", description="How token losses are averaged: grpo (each answer's mean, then the mean over answers), "
                            "dr_grpo (summed over tokens, divided by group_size x max_new_tokens, and advantages not "
                            "divided by the group's spread: no length or difficulty bias), dapo (every token of the "
                            "step counts once)")
    num_iterations: int = Field(1, ge=1, description="Updates per sampled group (GRPO's mu): each group of prompts "
                                                     "trains this many optimizer steps on the same answers, the "
                                                     "clipped ratio to the sampling policy keeping them close; "
                                                     "checkpoints fall between groups")
    clip: float = Field(0.2, gt=0, lt=1, description="The ratio to the sampling policy is clipped to [1 - clip, 1 + "
                                                     "clip_high]: no update moves an answer's probability far at once")
    clip_high: Optional[float] = Field(None, gt=0, description="Upper clip (DAPO's clip-higher: 0.28); clip when absent")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the answers; the loss scores them "
                                                      "at the same temperature, so it trains the policy that sampled")
    max_new_tokens: Optional[PositiveInt] = Field(None, description="Longest sampled answer; the task's answer budget "
                                                                    "(as evaluation uses) when absent")
    reward: list[RewardTerm] = Field(default_factory=list, description="The reward, summed over its terms; empty: "
                                                                       "the task's headline metric of each answer")

    @field_validator("reward", mode="before")
    @classmethod
    def _listed(cls, value):
        """`reward: {function: f.py:name}` is a list of one."""
        return [value] if isinstance(value, dict) else value

    @field_validator("reward")
    @classmethod
    def _named_once(cls, terms):
        """Each term is logged as reward/<name>: two of one name would be one figure."""
        names = [t.label for t in terms]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"two reward terms are named {', '.join(twice)}; each metric, the format and each "
                             f"function name may appear once")
        return terms


class ObjectiveSpec(Section):
    name: Literal["sft", "dpo", "orpo", "simpo", "kto", "grpo"] = Field(
        "sft", description="What the loss is: sft (next-token loss on the answer), dpo (chosen over rejected, against "
                           "the starting model as reference), orpo and simpo (no reference), kto (unpaired good/bad "
                           "answers), grpo (answers sampled from the model, rewarded by the task's metric: "
                           "objective.grpo). Every method (lora, full, freeze, ...) trains any of them")
    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="dpo: sigmoid (the DPO paper) or ipo (a squared "
                                                                   "loss on per-token mean log-probs; beta is IPO's tau)")
    beta: Optional[float] = Field(None, ge=0, description="Strength; by objective when absent: dpo 0.1, kto 0.1, "
                                                          "orpo 0.1 (lambda), simpo 2.0, grpo 0 (the KL weight "
                                                          "against the starting model; above 0 needs LoRA)")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: the reward margin asked of chosen over rejected")
    sft_weight: float = Field(0.0, ge=0, description="dpo, simpo: add this times the chosen answer's per-token "
                                                     "loss (RPO), which keeps the chosen answer from losing likelihood")
    desirable_weight: float = Field(1.0, gt=0, description="kto: weight of good answers")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: weight of bad answers (raise it when they are rarer)")
    grpo: GRPOSpec = GRPOSpec()
    _code_allowed: bool = PrivateAttr(False)  # --allow-code on this command (load_config): reward functions may run

    @model_validator(mode="after")
    def _positive_preference_beta(self):
        if self.beta == 0 and self.name != "grpo":
            raise ValueError(f"beta must be above 0 for {self.name}")
        return self

    @property
    def preference(self) -> bool:
        """Trained on preference items (pairs, or kto's answers) rather than the task's examples."""
        return self.name in PREFERENCE_OBJECTIVES

    @property
    def reinforcement(self) -> bool:
        """Trained on answers the model samples itself, rewarded (grpo)."""
        return self.name == "grpo"

    @property
    def lr_scale(self) -> float:
        """The share of the method's default learning rate this objective starts from."""
        return PREFERENCE_LR_SCALE if self.name != "sft" else 1.0

    @property
    def strength(self) -> float:
        return self.beta if self.beta is not None else DEFAULT_BETA.get(self.name, 0.0)
