"""Preference objectives (DPO and IPO, ORPO, SimPO, KTO) as a strategy of the one loop, not a second trainer.

The loop (loop.py) asks an objective three things per step: how many units the step's summed loss is
divided by, which sequences a micro-batch packs, and the summed loss of those items. The token loss of SFT
needs none of this and stays the loop's default path; a preference objective divides by the step's pairs
(or KTO answers), so gradient accumulation stays exact as it is for SFT.

The reference model is the model as training starts, its log-probs computed once for every item before the
first step and stored in each checkpoint, so resume is exact and no second copy of the weights is ever held.
Under LoRA that is the base with the adapter at its zero start (what TRL gets by switching the adapter off);
when model.path names an SFT run, it is that SFT model, which is what DPO after SFT needs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tailorlm.config import ObjectiveSpec
from tailorlm.data.batching import eval_batches
from tailorlm.data.samples import Preference, Sample
from tailorlm.errors import TailorError
from tailorlm.kernels.loss import sequence_logps
from tailorlm.train import distributed


TIE = 1e-4  # reward differences this small are float noise (references and evaluation batch differently)


class PreferenceObjective:
    """One of dpo (sigmoid or ipo loss), orpo, simpo, kto: per-item losses over sequence log-probs."""

    def __init__(self, spec: ObjectiveSpec):
        self.spec, self.name, self.beta = spec, spec.name, spec.strength
        self.needs_reference = spec.name in ("dpo", "kto")
        self.kl = 0.0  # kto: this step's reference point z0 (begin_step)

    # --- what the loop asks ---------------------------------------------------------------------------
    def units(self, items: list[Preference]) -> int:
        return len(items)

    def sequences(self, items: list[Preference]) -> list[Sample]:
        """Chosen and rejected of each pair side by side; kto trains on the answer alone (its mismatched pair
        only enters the step's KL estimate, without gradient)."""
        if self.name == "kto":
            return [it.chosen for it in items]
        return [s for it in items for s in (it.chosen, it.rejected)]

    def loss(self, forward, batch: dict, items: list[Preference]) -> torch.Tensor:
        """The summed loss of `items`; forward(fn) runs fn(model, shared_prefix) as a training forward."""
        logps, counts = forward(lambda model, shared_prefix: sequence_logps(model, batch, shared_prefix))
        return self._losses(logps, counts, items)[0].sum()

    def begin_step(self, group: list[list[Preference]], run, ctx) -> None:
        """kto: z0, the drift of the policy from the reference on mismatched answers over the whole step, with
        no gradient (the KTO paper's KL estimate); computed per step, not per micro-batch, so accumulation
        stays exact. run(fn) runs evaluation code on every process (Wrapped.run)."""
        if self.name != "kto":
            return
        world = distributed.world()
        total, n = 0.0, 0
        for items in group:
            mine, real = distributed.share(items, world)
            logps, _ = run(lambda model: _logps(model, [it.rejected for it in mine], ctx))
            if real:
                total += float((logps.double() - torch.tensor([it.reference[1] for it in mine], dtype=torch.float64,
                                                              device=logps.device)).sum())
                n += len(mine)
        total, n = distributed.sum_floats(total, n)
        self.kl = max(total / max(n, 1), 0.0)

    # --- references and evaluation ----------------------------------------------------------------------
    def attach_references(self, model, items: list[Preference], ctx, batch_size: int) -> None:
        """The reference log-probs of every item's two sequences under `model` as it is now."""
        if not self.needs_reference or not items:
            return
        chosen = _all_logps(model, [it.chosen for it in items], ctx, batch_size)
        rejected = _all_logps(model, [it.rejected for it in items], ctx, batch_size)
        for item, c, r in zip(items, chosen, rejected):
            item.reference = [c, r]

    @torch.no_grad()
    def evaluate(self, model, items: list[Preference], ctx, batch_size: int) -> dict:
        """On held-out items: pref_loss, reward_accuracy (the share whose chosen answer's reward is above the
        rejected one's; kto: whose reward is above z0 for a good answer, below for a bad one) and reward_margin
        (the mean of that difference)."""
        if not items:
            return {}
        was_training = model.training
        model.eval()
        losses, correct, margins = [], [], []
        if self.name == "kto":  # the held-out set's own z0
            kl = [float(lp) - it.reference[1] for it, lp in zip(items, _all_logps(model, [it.rejected for it in items], ctx, batch_size))]
            saved, self.kl = self.kl, max(sum(kl) / len(kl), 0.0)
        for idx in eval_batches(items, batch_size):
            batch = [items[i] for i in idx]
            logps, counts = _logps(model, self.sequences(batch), ctx)
            loss, chosen_reward, rejected_reward = self._losses(logps, counts, batch)
            losses += loss.tolist()
            if self.name == "kto":  # the reward over z0, on the side the label asks for
                good = torch.tensor([bool(it.desirable) for it in batch], device=chosen_reward.device)
                signed = torch.where(good, chosen_reward - rejected_reward, rejected_reward - chosen_reward)
            else:
                signed = chosen_reward - rejected_reward
            margins += signed.tolist()
            # a tie counts half: at the start the policy is its reference and every margin is 0 up to float noise
            correct += torch.where(signed.abs() <= TIE, 0.5, (signed > 0).double()).tolist()
        if self.name == "kto":
            self.kl = saved
        model.train(was_training)
        n = len(losses)
        return {"pref_loss": sum(losses) / n, "reward_accuracy": sum(correct) / n, "reward_margin": sum(margins) / n}

    # --- the formulas -------------------------------------------------------------------------------------
    def _losses(self, logps: torch.Tensor, counts: torch.Tensor, items: list[Preference]):
        """(per-item loss, chosen reward, rejected reward); kto's rejected reward is its z0."""
        n, beta, spec = len(items), self.beta, self.spec
        logps, counts = logps.float(), counts.float()
        if self.name == "kto":
            policy = logps[:n]
            ref = torch.tensor([it.reference[0] for it in items], device=policy.device)
            good = torch.tensor([bool(it.desirable) for it in items], device=policy.device)
            drift = policy - ref
            kl = torch.full_like(drift, self.kl)
            loss = torch.where(good, spec.desirable_weight * (1 - torch.sigmoid(beta * (drift - kl))),
                               spec.undesirable_weight * (1 - torch.sigmoid(beta * (kl - drift))))
            return loss, beta * drift.detach(), beta * kl
        pair, tokens = logps[:2 * n].view(n, 2), counts[:2 * n].view(n, 2).clamp(min=1)
        mean = pair / tokens  # per-token mean log-probs: what orpo, simpo and ipo compare
        if self.name == "dpo":
            ref = torch.tensor([it.reference for it in items], device=pair.device)
            if spec.loss == "ipo":  # IPO regresses the mean log-ratio gap to 1/(2 tau)
                ref_mean = ref / tokens
                rewards = mean - ref_mean
                loss = ((rewards[:, 0] - rewards[:, 1]) - 1 / (2 * beta)) ** 2
            else:
                rewards = beta * (pair - ref)
                loss = -F.logsigmoid(rewards[:, 0] - rewards[:, 1])
        elif self.name == "simpo":
            rewards = beta * mean
            loss = -F.logsigmoid(rewards[:, 0] - rewards[:, 1] - spec.simpo_gamma)
        elif self.name == "orpo":
            # log odds = log p - log(1 - p) with p the per-token mean probability; expm1 keeps 1 - p exact near 1
            mean_c = mean.clamp(max=-1e-6)
            log_odds = mean_c - torch.log(-torch.expm1(mean_c))
            loss = -mean[:, 0] - beta * F.logsigmoid(log_odds[:, 0] - log_odds[:, 1])
            rewards = beta * mean
        else:
            raise TailorError(f"internal: unknown preference objective {self.name}")
        if spec.sft_weight and self.name in ("dpo", "simpo"):
            loss = loss - spec.sft_weight * mean[:, 0]
        return loss, rewards[:, 0].detach(), rewards[:, 1].detach()


def make_objective(spec: ObjectiveSpec) -> PreferenceObjective | None:
    """The preference objective of a run; None for sft, which is the loop's own token loss."""
    return PreferenceObjective(spec) if spec.preference else None


def _logps(model, samples: list[Sample], ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of `samples` in one batch, without gradient, as training builds batches."""
    # Under FSDP every rank must run each block the same number of times, and ranks score different items
    # here: no separate shared-prefix pass (as Wrapped.forward does for training).
    once = distributed.world().mode == "fsdp"
    with torch.no_grad(), ctx.autocast():
        logps, counts = sequence_logps(model, ctx.batch(samples), shared_prefix=not once)
    return logps[:len(samples)].double(), counts[:len(samples)]


def _all_logps(model, samples: list[Sample], ctx, batch_size: int) -> list[float]:
    out = [0.0] * len(samples)
    for idx in eval_batches(samples, batch_size):
        logps, _ = _logps(model, [samples[i] for i in idx], ctx)
        for i, value in zip(idx, logps.tolist()):
            out[i] = value
    return out
