"""Training objectives as strategies of the one loop: SFT's token loss and the preference objectives (DPO and
IPO, ORPO, SimPO, KTO), each an object of one interface, so the loop has no special case for any of them.

The loop (loop.py) asks an objective the same things every step: how many units the step's summed loss is
divided by (SFT: completion tokens; pairs, or KTO answers), which sequences a micro-batch packs, and the summed
loss of those items. So gradient accumulation is exact for every objective alike. Between steps it may ask
for more: begin_step (KTO's reference point), reference log-probs before training, and figures on held-out
items at each evaluation. An objective that generates its own samples would add its own begin_step.

The reference model of DPO and KTO is the model as training starts, its log-probs computed once for every item
before the first step and stored in each checkpoint, so resume is exact and no second copy of the weights is
ever held. Under LoRA that is the base with the adapter at its zero start (what TRL gets by switching the
adapter off); when model.path names an SFT run, it is that SFT model, which is what DPO after SFT needs.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from tailorlm.config import ObjectiveSpec
from tailorlm.data.batching import eval_batches
from tailorlm.data.samples import IGNORE, Preference, Sample
from tailorlm.kernels.loss import completion_loss, sequence_logps
from tailorlm.train import distributed


TIE = 1e-4  # reward differences this small are float noise (references and evaluation batch differently)


class Objective:
    """The interface the loop trains through. `forward(fn)` runs fn(model, shared_prefix) as a training forward
    (Wrapped.forward: with DDP/FSDP's gradient hooks)."""

    name = "sft"
    needs_reference = False  # reference log-probs computed before the first step and kept in checkpoints
    repeats = 1  # optimizer steps each micro-batch group trains (GRPO's num_iterations); checkpoints between them

    def unit_name(self) -> str:
        """What a training item is, for the start-of-training line."""
        return "samples"

    def units(self, items: list) -> int:
        """The step's normaliser: its summed loss is divided by this."""
        raise NotImplementedError

    def sequences(self, items: list) -> list[Sample]:
        """The sequences a micro-batch of `items` packs."""
        raise NotImplementedError

    def loss(self, forward, batch: dict, items: list) -> torch.Tensor:
        """The summed loss of `items`, whose sequences are `batch`."""
        raise NotImplementedError

    def answers(self, items: list) -> list[Sample]:
        """One sample per item whose loss after training points at mislabeled data (fit.example_losses)."""
        return list(items)

    def begin_step(self, group: list[list], run, ctx) -> None:
        """Before a step's micro-batches; run(fn) runs evaluation code on every process (Wrapped.run)."""

    def attach_references(self, model, items: list, ctx, batch_size: int) -> None:
        """The reference log-probs of `items` under `model` as it is now (needs_reference only)."""

    def evaluate(self, model, items: list, ctx, batch_size: int) -> dict:
        """Figures on held-out items at each evaluation; SFT's come from the run's own evaluation hooks."""
        return {}

    def figures(self) -> dict:
        """Figures of the step just taken, logged beside its loss (GRPO's rewards)."""
        return {}


class TokenLoss(Objective):
    """SFT: cross-entropy on the completion tokens (the loss mask), normalised by the step's completion tokens,
    so accumulating 4 batches of 2 gives the same update as one batch of 8."""

    def units(self, items: list[Sample]) -> int:
        return sum(sum(t != IGNORE for t in s.labels[1:]) for s in items)

    def sequences(self, items: list[Sample]) -> list[Sample]:
        return items

    def loss(self, forward, batch: dict, items: list[Sample]) -> torch.Tensor:
        return forward(lambda model, shared_prefix: completion_loss(model, batch, shared_prefix=shared_prefix))[0]


class PreferenceObjective(Objective):
    """The preference objectives' shared part: per-item losses over summed sequence log-probs, held-out
    figures (pref_loss, reward_accuracy, reward_margin). Each subclass gives its formula (_losses)."""

    def __init__(self, spec: ObjectiveSpec):
        self.spec, self.name, self.beta = spec, spec.name, spec.strength

    def unit_name(self) -> str:
        return f"pairs ({self.name})"

    def units(self, items: list[Preference]) -> int:
        return len(items)

    def sequences(self, items: list[Preference]) -> list[Sample]:
        """Chosen and rejected of each pair side by side."""
        return [s for it in items for s in (it.chosen, it.rejected)]

    def answers(self, items: list[Preference]) -> list[Sample]:
        return [it.chosen for it in items]

    def loss(self, forward, batch: dict, items: list[Preference]) -> torch.Tensor:
        logps, counts = forward(lambda model, shared_prefix: sequence_logps(model, batch, shared_prefix))
        return self._losses(logps, counts, items)[0].sum()

    def attach_references(self, model, items: list[Preference], ctx, batch_size: int) -> None:
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
        with self._held_out(model, items, ctx, batch_size):
            for idx in eval_batches(items, batch_size):
                batch = [items[i] for i in idx]
                logps, counts = _logps(model, self.sequences(batch), ctx)
                loss, chosen_reward, rejected_reward = self._losses(logps, counts, batch)
                losses += loss.tolist()
                signed = self._margin(chosen_reward, rejected_reward, batch)
                margins += signed.tolist()
                # a tie counts half: at the start the policy is its reference and every margin is 0 up to float noise
                correct += torch.where(signed.abs() <= TIE, 0.5, (signed > 0).double()).tolist()
        model.train(was_training)
        n = len(losses)
        return {"pref_loss": sum(losses) / n, "reward_accuracy": sum(correct) / n, "reward_margin": sum(margins) / n}

    def _held_out(self, model, items, ctx, batch_size):
        """What evaluation on held-out items sets up and puts back (KTO: their own reference point)."""
        return contextlib.nullcontext()

    def _margin(self, chosen_reward: torch.Tensor, rejected_reward: torch.Tensor, items) -> torch.Tensor:
        return chosen_reward - rejected_reward

    def _losses(self, logps: torch.Tensor, counts: torch.Tensor, items: list[Preference]):
        """(per-item loss, chosen reward, rejected reward)."""
        raise NotImplementedError

    def _pairs(self, logps: torch.Tensor, counts: torch.Tensor, n: int):
        """(summed log-probs, per-token mean log-probs, token counts), each (pairs, 2): chosen then rejected."""
        pair, tokens = logps.float()[:2 * n].view(n, 2), counts.float()[:2 * n].view(n, 2).clamp(min=1)
        return pair, pair / tokens, tokens

    def _with_sft(self, loss: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """objective.sft_weight: the chosen answer's own token loss added (DPO, SimPO)."""
        return loss - self.spec.sft_weight * mean[:, 0] if self.spec.sft_weight else loss


class DPO(PreferenceObjective):
    """DPO's sigmoid loss on the log-ratio margin against the reference, or IPO (objective.loss: ipo), which
    regresses the mean log-ratio gap to 1/(2 tau)."""

    needs_reference = True

    def _losses(self, logps, counts, items):
        pair, mean, tokens = self._pairs(logps, counts, len(items))
        ref = torch.tensor([it.reference for it in items], device=pair.device)
        if self.spec.loss == "ipo":
            rewards = mean - ref / tokens
            loss = ((rewards[:, 0] - rewards[:, 1]) - 1 / (2 * self.beta)) ** 2
        else:
            rewards = self.beta * (pair - ref)
            loss = -F.logsigmoid(rewards[:, 0] - rewards[:, 1])
        return self._with_sft(loss, mean), rewards[:, 0].detach(), rewards[:, 1].detach()


class SimPO(PreferenceObjective):
    """SimPO: the per-token mean log-prob as the reward, no reference, with a target margin gamma."""

    def _losses(self, logps, counts, items):
        _, mean, _ = self._pairs(logps, counts, len(items))
        rewards = self.beta * mean
        loss = -F.logsigmoid(rewards[:, 0] - rewards[:, 1] - self.spec.simpo_gamma)
        return self._with_sft(loss, mean), rewards[:, 0].detach(), rewards[:, 1].detach()


class ORPO(PreferenceObjective):
    """ORPO: the chosen answer's token loss plus a log odds-ratio term, no reference."""

    def _losses(self, logps, counts, items):
        _, mean, _ = self._pairs(logps, counts, len(items))
        # log odds = log p - log(1 - p) with p the per-token mean probability; expm1 keeps 1 - p exact near 1
        mean_c = mean.clamp(max=-1e-6)
        log_odds = mean_c - torch.log(-torch.expm1(mean_c))
        loss = -mean[:, 0] - self.beta * F.logsigmoid(log_odds[:, 0] - log_odds[:, 1])
        rewards = self.beta * mean
        return loss, rewards[:, 0].detach(), rewards[:, 1].detach()


class KTO(PreferenceObjective):
    """KTO: single answers labelled desirable or not, each against a reference point z0, the policy's drift
    from the reference on mismatched answers. Trains on the answer alone; its mismatched pair only enters the
    step's z0, without gradient."""

    needs_reference = True

    def __init__(self, spec: ObjectiveSpec):
        super().__init__(spec)
        self.kl = 0.0  # this step's reference point z0 (begin_step)

    def unit_name(self) -> str:
        return "answers (kto)"

    def sequences(self, items: list[Preference]) -> list[Sample]:
        return [it.chosen for it in items]

    def begin_step(self, group: list[list[Preference]], run, ctx) -> None:
        """z0 over the whole step with no gradient (the KTO paper's KL estimate); per step, not per micro-batch,
        so accumulation stays exact."""
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

    def _held_out(self, model, items, ctx, batch_size):
        """The held-out set's own z0 while it is scored; the training one is put back afterwards."""
        @contextlib.contextmanager
        def own_reference_point():
            drift = [float(lp) - it.reference[1]
                     for it, lp in zip(items, _all_logps(model, [it.rejected for it in items], ctx, batch_size))]
            saved, self.kl = self.kl, max(sum(drift) / len(drift), 0.0)
            try:
                yield
            finally:
                self.kl = saved

        return own_reference_point()

    def _margin(self, chosen_reward, rejected_reward, items) -> torch.Tensor:
        """The reward over z0, on the side the label asks for."""
        good = torch.tensor([bool(it.desirable) for it in items], device=chosen_reward.device)
        return torch.where(good, chosen_reward - rejected_reward, rejected_reward - chosen_reward)

    def _losses(self, logps, counts, items):
        """Its rejected reward is z0."""
        n, beta, spec = len(items), self.beta, self.spec
        policy = logps.float()[:n]
        ref = torch.tensor([it.reference[0] for it in items], device=policy.device)
        good = torch.tensor([bool(it.desirable) for it in items], device=policy.device)
        drift = policy - ref
        kl = torch.full_like(drift, self.kl)
        loss = torch.where(good, spec.desirable_weight * (1 - torch.sigmoid(beta * (drift - kl))),
                           spec.undesirable_weight * (1 - torch.sigmoid(beta * (kl - drift))))
        return loss, beta * drift.detach(), beta * kl


OBJECTIVES = {"sft": lambda spec: TokenLoss(), "dpo": DPO, "simpo": SimPO, "orpo": ORPO, "kto": KTO}


def make_objective(spec: ObjectiveSpec, sampler=None) -> Objective:
    """The run's objective (objective.name); adding one means a class and its name in the config. GRPO (grpo.py)
    samples its own answers: `sampler` (eval/rollouts.py) answers and rewards its prompts."""
    if spec.name == "grpo":
        from tailorlm.train.grpo import GRPO

        if sampler is None:
            raise ValueError("internal: objective grpo needs a sampler")
        return GRPO(spec, sampler)
    return OBJECTIVES[spec.name](spec)


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
