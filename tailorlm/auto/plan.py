"""What `tailor auto` tries, and how much of each fits the budget.

Recipes. Every candidate model gets LoRA (rank 16, alpha 32) at three learning rates, and full fine-tuning at
two where the model is small enough to train whole (FULL_MAX_PARAMS). The rates bracket each method's usual
default by a factor of about three each way (LoRA 3e-4, full 3e-5): the grid is coarse on purpose, since on a
CPU budget a handful of trials is what fits, and a model trained at the wrong rate by 3x still tells its
rank among the others. They are tried in that order of prior, so when the budget cuts the list, what goes
first is the least likely to win.

Steps. The longest trial trains 3 epochs (the usual default), and at least MIN_FULL_STEPS optimizer steps so a
small table is still seen often enough, at most MAX_FULL_STEPS. A config that sets train.max_steps or
train.epochs keeps its own. Otherwise a budget too short for that length shortens it (fitted_top).

Successive halving (Jamieson & Talwalkar 2016; Li et al. 2017 for Hyperband): every config trains for the
first rung's steps, the best third (ETA) trains three times as long from scratch, and so on up to the full
length. Trials restart rather than continue so each has a learning-rate schedule matched to its own length.
The first rung is always the shortest (a ninth of the full length, at least MIN_RUNG_STEPS); the budget
decides how many configs start, and how far up the rungs the best of them go.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from tailorlm.auto.candidates import Candidate
from tailorlm.errors import TailorError

ETA = 3  # each rung keeps the best 1/ETA of the one before, and trains them ETA times longer
FULL_MAX_PARAMS = 400_000_000  # full fine-tuning is offered up to this size (its optimizer state is 4x the weights)
LORA_RATES = (3e-4, 1e-3, 1e-4)  # in order of prior: the first is the one most often best
FULL_RATES = (3e-5, 1e-4)
LORA_RANK = 16
EPOCHS = 3
MIN_FULL_STEPS, MAX_FULL_STEPS = 60, 1000
MIN_RUNG_STEPS = 4  # fewer steps than this says nothing about a recipe
# A trial of the top length evaluates at each third of it and keeps its best checkpoint: no longer rung follows
# it, so it is the model the user gets, and stopping before overfitting is worth two more evaluations (BBC News,
# Gemma-3-270M at lr 3e-4: the validation loss was lowest at step 80 of 120)
TOP_EVALUATIONS = 3


@dataclass(frozen=True)
class Recipe:
    method: str  # lora | full (or the method the config sets)
    lr: float | None  # None: the method's default
    rank: int | None = None

    def overrides(self) -> dict[str, object]:
        out: dict[str, object] = {"method.name": self.method}
        if self.lr is not None:
            out["train.lr"] = self.lr
        if self.rank:
            out.update({"method.lora.r": self.rank, "method.lora.alpha": 2 * self.rank})
        return out

    def label(self) -> str:
        lr = "default lr" if self.lr is None else f"lr {self.lr:g}"
        return f"LoRA r{self.rank}, {lr}" if self.method == "lora" else f"{self.method}, {lr}"


@dataclass(frozen=True)
class Config:
    """One model with one recipe: what a trial trains, at some rung's length."""
    candidate: Candidate
    recipe: Recipe

    @property
    def key(self) -> str:
        return f"{self.candidate.name} | {self.recipe.label()}"


def recipes(candidate: Candidate, fixed: dict[str, object], method_default: str = "lora") -> list[Recipe]:
    """The recipes to try on one model, in order of prior; keys the user's config sets are kept as set. A
    learning rate the config sets belongs to its method (method_default when it names none): a LoRA rate
    would wreck full fine-tuning."""
    method = fixed.get("method.name") or (method_default if fixed.get("train.lr") is not None else None)
    out = []
    if method in (None, "lora"):
        rank = int(fixed.get("method.lora.r") or LORA_RANK)
        out += [Recipe("lora", lr, rank) for lr in LORA_RATES]
    if method in (None, "full") and candidate.params <= FULL_MAX_PARAMS:
        out += [Recipe("full", lr) for lr in FULL_RATES]
    if method not in (None, "lora", "full"):  # another method the user chose: its own default rate
        out.append(Recipe(str(method), None))
    if fixed.get("train.lr") is not None:  # one rate, as set
        lr = float(fixed["train.lr"])
        out = list({r.method: Recipe(r.method, lr, r.rank) for r in out}.values())
    return out


def ladder(top: int, rungs: int = 3) -> list[int]:
    """The rung lengths a search may use, shortest first, ending at `top`."""
    return rung_steps(top, min(rungs, _max_depth(top)))


def full_steps(n_train: int, batch: int, fixed: dict[str, object]) -> int:
    """The longest trial's optimizer steps: the config's, else EPOCHS passes within the bounds above."""
    if fixed.get("train.max_steps"):
        return int(fixed["train.max_steps"])
    epochs = float(fixed.get("train.epochs") or EPOCHS)
    steps = math.ceil(epochs * n_train / batch)
    return steps if "train.epochs" in fixed else min(max(steps, MIN_FULL_STEPS), MAX_FULL_STEPS)


def rung_steps(top: int, rungs: int) -> list[int]:
    """Steps of each rung, shortest first, each ETA times the one before, ending at `top`."""
    return [max(MIN_RUNG_STEPS, round(top / ETA ** (rungs - 1 - i))) for i in range(rungs)]


def survivors(n: int, rungs: int) -> list[int]:
    """How many configs train at each rung."""
    counts = [n]
    for _ in range(rungs - 1):
        counts.append(max(1, math.ceil(counts[-1] / ETA)))
    return counts


@dataclass
class Rates:
    """What a trial costs on this machine, per model: seconds per optimizer step (per method), to start (load
    the model and data), and per generated validation answer. The cost model's figures until trials measure
    them."""
    step: dict[tuple[str, str], float]
    load: dict[str, float]
    per_answer: dict[str, float]
    answers: int = 0  # validation answers each evaluation generates
    warm: bool = False  # a trial has run in this process (the first one pays one-time imports)
    top: int = 0  # the ladder's top length: trials of it evaluate TOP_EVALUATIONS times

    def evaluations(self, steps: int) -> int:
        return TOP_EVALUATIONS if steps == self.top else 1

    def trial(self, config: Config, steps: int) -> float:
        """A trial's seconds: its steps, its start, and its evaluations (trials.py)."""
        name = config.candidate.name
        return steps * self.step[(name, config.recipe.method)] + self.load[name] + \
            self.evaluations(steps) * self.answers * self.per_answer[name]


@dataclass
class Plan:
    configs: list[Config]
    rungs: list[int]  # steps per rung
    seconds: float  # the plan's estimate, trials only (those already in the study cost nothing)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (config key, why)

    def cost(self, rates: Rates, free: set = frozenset()) -> float:
        return plan_cost(self.configs, self.rungs, rates, free)


def plan_cost(configs: list[Config], rungs: list[int], rates: Rates, free: set = frozenset()) -> float:
    """Seconds of a successive-halving plan, taking the dearest configs as the ones that go on (an upper bound).
    Trials in `free` ((key, steps) already in the study) cost nothing."""
    total = 0.0
    for steps, n in zip(rungs, survivors(len(configs), len(rungs))):
        costs = sorted((0.0 if (c.key, steps) in free else rates.trial(c, steps) for c in configs), reverse=True)
        total += sum(costs[:n])
    return total


def make_plan(configs: list[Config], lengths: list[int], rates: Rates, seconds: float,
              free: set = frozenset()) -> Plan:
    """The plan to start from, on the rung `lengths` (ladder()): the first of rung_sets() on which as many configs
    as possible fit `seconds` at the estimated rates (the last ones, lowest prior, left out first) while halving
    still has a choice to make at every rung (_fewest). One config has nothing to halve: it trains the longest
    length that fits. The search then widens or narrows the first rung and adds the longer rungs back as trials
    measure the machine (search.py): many short trials first, the promising ones continued."""
    if not configs:
        raise TailorError("tailor auto: no recipe to try")
    if len(configs) == 1:
        for steps in reversed(lengths):
            cost = plan_cost(configs, [steps], rates, free)
            if cost <= seconds:
                return Plan(configs, [steps], cost)
    for rungs in rung_sets(lengths):
        # one config trained to the top chooses nothing: choosing among several at shorter lengths comes first
        fewest = max(_fewest(len(rungs)), 2 if rungs[-1] == lengths[-1] and len(lengths) > 1 else 1)
        for n in range(len(configs), fewest - 1, -1):
            cost = plan_cost(configs[:n], rungs, rates, free)
            if cost <= seconds:
                return Plan(configs[:n], rungs, cost, dropped(configs[n:]))
    cheapest = min(rates.trial(c, lengths[0]) for c in configs)
    raise TailorError(f"tailor auto: the budget left for the search ({duration(max(seconds, 0))}) is too small: the "
                      f"shortest trial ({lengths[0]} steps) needs about {duration(cheapest)}; give a larger --budget")


FIT_SHARE = 0.98  # a top is fitted to this share of the time left: the search plans a moment later, on less


def fitted_top(configs: list[Config], top: int, rates: Rates, seconds: float,
               free: set = frozenset()) -> tuple[int, int]:
    """The ladder's top length for `seconds`, and how many configs the first round of its plan was fitted with
    (0: the top is `top`, full_steps). `top` while a plan ending at it fits with a choice to make (make_plan);
    else the longest length at which the first ETA configs (or two) fit a first rung and then the best of them
    at the top, or all of them at the top alone (where starting a trial costs more than its steps). So a budget
    too short for 3 epochs still ends at a trial trained as long as the budget allows, with its evaluations
    and its kept checkpoint, rather than at a few configs of a short rung (SST-2, 15 minutes: 3 epochs is 750
    steps, one Gemma-3-270M trial of them 39 minutes; the plan fell back to three configs at 83 steps, and the
    winner scored 0.914 on test; fitted, 146 steps and 0.928). When no top longer than the full ladder's first
    rung fits, `top`: make_plan then falls back to the ladder's shorter rungs, or says the budget is too
    small. A length the user set (train.max_steps, train.epochs) is not fitted (run.py)."""
    try:
        plan = make_plan(configs, ladder(top), replace(rates, top=top), seconds, free)
        if plan.rungs[-1] == top and (len(plan.configs) > 1 or len(configs) == 1):
            return top, 0
    except TailorError:  # not even its shortest trial fits; a shorter top's may
        pass

    def fits(length: int, n: int) -> bool:
        at = replace(rates, top=length)
        return any(plan_cost(configs[:n], rungs, at, free) <= seconds * FIT_SHARE
                   for rungs in ([length], [ladder(length)[0], length])[:1 if n == 1 else 2])

    # from the longest down (at most MAX_FULL_STEPS prices): the first rung's length falls where the ladder
    # gains a rung, so the cost does not grow evenly with the length and a bisection could miss the longest.
    # ETA configs first; two when three do not fit. A top no longer than the full ladder's first rung would train
    # no longer than make_plan's fallback (configs at that rung), with less choice
    shortest = max(ETA * MIN_RUNG_STEPS, ladder(top)[0] + 1)
    for n in range(min(ETA, len(configs)), 1 if len(configs) > 1 else 0, -1):
        found = next((length for length in range(top - 1, shortest - 1, -1) if fits(length, n)), None)
        if found is not None:
            return found, n
    return top, 0


def rung_sets(lengths: list[int]) -> list[list[int]]:
    """The rung lists a plan may use, best first. Every one ends at the ladder's top length while one does fit,
    as every Hyperband bracket ends at the full budget (Li et al. 2017): the winner is the model the user gets,
    and a short rung favours the recipe that learns fastest early, not the one that ends best (the default
    job, 10 minutes: the winner of 40 steps scored 0.860 on test, the same recipe trained to the top 0.960).
    So the whole ladder; then without its middle rungs; then starting higher. Only when none of those fits do
    the longest rungs go (the ladder's prefixes)."""
    to_top = [lengths[i:] for i in range(len(lengths))]  # the whole ladder, then starting higher
    for cut in range(1, len(lengths) - 1):  # the shortest rung kept, middle rungs dropped (longest first)
        to_top.insert(cut, lengths[:len(lengths) - 1 - cut] + lengths[-1:])
    return to_top + [lengths[:depth] for depth in range(len(lengths) - 1, 0, -1)]


def narrower(rungs: list[int]) -> list[int]:
    """The plan's rungs with one fewer, when the measured rates leave too little: a middle rung goes before the
    top (rung_sets())."""
    return rungs[:-2] + rungs[-1:] if len(rungs) > 2 else rungs[:-1]


def dropped(configs: list[Config]) -> list[tuple[str, str]]:
    return [(c.key, "the budget: it did not fit beside the configs before it") for c in configs]


def _fewest(depth: int) -> int:
    """The fewest configs worth halving over `depth` rungs: more than one goes on from each rung but the last."""
    return 1 if depth == 1 else ETA ** (depth - 2) + 1


def next_rung(plan: Plan, lengths: list[int]) -> int | None:
    """The ladder's next length after the plan's last rung, when the first plan stopped short of the top."""
    longer = [steps for steps in lengths if steps > plan.rungs[-1]]
    return longer[0] if longer else None


def _max_depth(top: int) -> int:
    """Rungs a run of `top` steps can hold with a first rung of MIN_RUNG_STEPS or more."""
    depth = 1
    while top / ETA ** depth >= MIN_RUNG_STEPS and depth < 3:
        depth += 1
    return depth


BUDGET = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_budget(text: str, setting: str = "--budget") -> float:
    """'20m', '1h', '1h30m', '90s' or a bare number of minutes, in seconds; errors name `setting`."""
    text = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text) * 60
    match = BUDGET.match(text)
    if not text or not match or not any(match.groups()):
        raise TailorError(f"{setting} {text!r}: give a duration such as 20m, 1h, 1h30m or 90s")
    hours, minutes, seconds = (float(g or 0) for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise TailorError(f"{setting} {text!r}: must be more than zero")
    return total


def duration(seconds: float) -> str:
    seconds = max(round(seconds), 0)
    if seconds < 120:
        return f"{seconds} s"
    minutes, rest = divmod(seconds, 60)
    return f"{minutes} min {rest} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"
