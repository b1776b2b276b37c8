"""The run spec's sections: one typed, validated pydantic model per part of a run (model, data, template,
method, objective, train, eval, output). Loading YAML into them is loading.py's job.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (BeforeValidator, Field, NonNegativeInt, PositiveInt, PrivateAttr,
                      field_validator)

from tailorlm.config.objective import DEFAULT_BETA, PREFERENCE_LR_SCALE, GRPOSpec, ObjectiveSpec, RewardTerm  # noqa: F401
from tailorlm.config.section import Section

DEFAULT_CONFIG = "bbc_news.yaml"  # the embedded default job, in tailorlm/defaults/


Policy = Literal["warn", "error", "ignore"]


def _label_value_text(value: Any) -> Any:
    """A label_names key as the text it is matched against: YAML reads {0: negative} with an integer key, and
    labels are compared as text ('0'). true/false are refused: YAML also reads yes/no/on/off as those."""
    if isinstance(value, bool):
        raise ValueError(f"YAML read this key as {str(value).lower()}; quote it (e.g. 'yes': positive) to mean the text")
    return str(value) if isinstance(value, int) else value


LabelValue = Annotated[str, BeforeValidator(_label_value_text)]




class ModelSpec(Section):
    path: str = Field("default", description="'default' (embedded SmolLM2-135M-Instruct), a HF folder, a .gguf file or a hub id")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="auto: bfloat16 on a GPU that has it, else float32")
    trust_remote_code: bool = Field(False, description="Run Python code shipped with the model. A file alone cannot turn this "
                                                       "on: the command must say so too (--trust-remote-code)")


class SplitSpec(Section):
    validation: float = Field(0.1, gt=0, lt=1, description="Share of rows split off for validation when no validation file is given")
    test: float = Field(0.2, gt=0, lt=1, description="Share of rows split off for test when no test file is given")
    seed: int = 42
    stratify: bool = Field(True, description="Keep label proportions equal across splits")


class LimitSpec(Section):
    train: Optional[PositiveInt] = Field(None, description="Use at most this many training rows (stratified, seeded)")
    validation: Optional[PositiveInt] = Field(None, description="Use at most this many validation rows")
    test: Optional[PositiveInt] = Field(None, description="Use at most this many test rows: every comparison is "
                                                          "scored on them, so fewer rows are faster but noisier")


class DataSpec(Section):
    train: str = Field("builtin:bbc_news", description="Training data: a file; builtin:NAME; SOURCE|TARGET (two line-aligned files, format parallel); hf:NAME[:CONFIG][@SPLIT] (a Hugging Face hub dataset, e.g. hf:ag_news); a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk (FOLDER@SPLIT picks a split; without one, its 'train' split, and its 'validation'/'test' splits fill data.validation/data.test when those are absent); an .arrow file of a saved dataset; memory:NAME (data passed from Python: tailorlm.run(data=...))")
    validation: Optional[str] = Field(None, description="Validation data, any source data.train takes; when absent, the validation split of a DatasetDict named by data.train, else split off the training data")
    test: Optional[str] = Field(None, description="Test data, any source data.train takes; when absent, the test split of a DatasetDict named by data.train, else split off the training data")
    format: Literal["auto", "csv", "tsv", "jsonl", "json", "parquet", "label_text", "conll", "parallel", "chat", "arrow"] = Field(
        "auto", description="auto picks by file extension (.conll/.bio/.iob: conll; .arrow: arrow; 'a|b': parallel; "
                            "hf:, memory: and folders need none); arrow is one Arrow file of a saved dataset; "
                            "label_text is 'LABEL text' per line (SST-2, TREC); conll is one 'TOKEN TAG' per line, "
                            "BIO tags, blank lines between sentences (NER); parallel is two line-aligned files "
                            "'train.en|train.de', plain or .gz (translation); chat requires every JSON/JSONL record "
                            "to be OpenAI 'messages', ShareGPT 'conversations' or Alpaca 'instruction'/'output' "
                            "(json and jsonl also recognise these per record)")
    skip_bad_rows: bool = Field(False, description="Skip rows with bad values (empty, wrong type, unknown label) and report the count per reason, instead of stopping")
    encoding: str = Field("utf-8", description="Text encoding of the data files (a byte-order mark is always accepted)")
    columns: dict[str, str] = Field(default_factory=dict, description="Template field -> column in the file, e.g. {text: review, label: stars}")
    label_names: dict[LabelValue, str] = Field(default_factory=dict, description="Raw label value -> the word the model should answer, e.g. {0: negative}; for a Hugging Face ClassLabel column, its class names when absent")
    split: SplitSpec = SplitSpec()
    limit: LimitSpec = LimitSpec()
    empty_share: Optional[float] = Field(None, gt=0, lt=1, description="Extraction (ner): keep training sentences that have no entity up to this share of the training split (e.g. 0.2), applied before data.limit. When most sentences have none, a model otherwise learns that 'none' is always right. Validation and test keep theirs")


class TemplateSpec(Section):
    _source: str = PrivateAttr("the config")  # the file it came from, for render errors found later
    preset: Literal["classification", "ner", "qa", "translation", "math", "instruction", "chat"] = Field(
        "classification", description="The task: its default template, answer parsing and metrics (tailorlm/tasks/)")
    instruction: Optional[str] = Field(None, description="Jinja2; sees the row's fields and `labels`; the preset's when absent")
    prompt: Optional[str] = Field(None, description="Jinja2 for the whole user prompt; the preset's when absent")
    completion: Optional[str] = Field(None, description="Jinja2 for the answer the model learns to give; the preset's when absent")
    # inline by default: on WNUT-17 with the same recipe it scored 5x the entity F1 of list (BENCHMARKS.md)
    entity_format: Literal["list", "inline", "json"] = Field("inline", description="ner preset: how answers write the entities: list ('person: John Smith; location: Paris', or 'none'), inline (the sentence copied with each entity marked '[John Smith | person]') or json ('[{\"type\": \"person\", \"text\": \"John Smith\"}]')")
    system: Optional[str] = Field(None, description="System prompt; the chat template's default when absent")
    chat_template: Literal["auto", "never"] = Field("auto", description="auto: wrap in the model's chat template when it has one")
    train_on: Literal["all_assistant", "last_assistant"] = Field("all_assistant", description="chat preset: which assistant turns carry loss (a message's \"weight\": 0 turns it off); held-out conversations are scored on their last")
    max_length: PositiveInt = Field(512, description="Tokens per sample, prompt and completion together")
    overlong: Literal["truncate_prompt", "drop"] = Field("truncate_prompt", description="What to do with samples over max_length")
    truncate_field: Optional[str] = Field(None, description="The input field shortened by truncate_prompt; by preset (text, context, source, question, input)")


class LoraSpec(Section):
    r: PositiveInt = Field(16, description="Adapter rank: trainable parameters grow with it; 8-64 is usual")
    alpha: float = Field(32, gt=0)
    # 0 by default: dropout on the adapter input copies every activation it touches (13% of a CPU step),
    # and small-data overfitting is better caught by validation.
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Union[str, list[str]] = Field("all-linear", description="'all-linear' or a list of module names")
    use_dora: bool = False
    use_rslora: bool = False


class FreezeSpec(Section):
    first_blocks: int = Field(0, ge=0, description="Freeze the embeddings and the first N decoder blocks")
    patterns: list[str] = Field(default_factory=list, description="Also freeze parameters whose name matches one of these glob patterns, e.g. '*.self_attn.*'")


class UnfreezeSpec(Section):
    groups: PositiveInt = Field(4, description="Layer groups, top to bottom (head and top blocks first, embeddings last)")
    unit: Literal["step", "epoch"] = Field("step", description="What `every` counts")
    every: Optional[PositiveInt] = Field(None, description="Unfreeze the next group every N units; by default the groups are spread evenly over the run")
    lr_decay: float = Field(1.0, gt=0, le=1, description="Discriminative rates: group g (0 = top) trains at lr * lr_decay^g (ULMFiT used 1/2.6)")


class MethodSpec(Section):
    name: Literal["lora", "qlora", "full", "freeze", "gradual_unfreeze"] = Field(
        "lora", description="lora (DoRA, rsLoRA through method.lora), qlora (4-bit NF4 base, CUDA), full, freeze "
                            "(full fine-tuning with frozen layers), gradual_unfreeze (top groups first, then down)")
    lora: LoraSpec = LoraSpec()
    freeze: FreezeSpec = FreezeSpec()
    unfreeze: UnfreezeSpec = UnfreezeSpec()


# Small learning rates by method: LoRA's low-rank update tolerates a larger step than moving every base weight.
DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5, "freeze": 2e-5, "gradual_unfreeze": 2e-5}


class DistSpec(Section):
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="Under torchrun: ddp replicates the model on every process; fsdp (FSDP2, fully_shard) shards weights, gradients and optimizer state across them")
    timeout_minutes: PositiveInt = Field(60, description="How long a process waits for the others in a collective (rank 0 runs the prompting baselines and evaluations alone under ddp)")


class TrainSpec(Section):
    epochs: PositiveInt = Field(1, description="Passes over the training split (train.max_steps, when given, wins)")
    max_steps: Optional[PositiveInt] = Field(None, description="Stop after this many optimizer steps (overrides epochs)")
    max_seconds: Optional[float] = Field(None, gt=0, description="Stop once the training loop has run this long (at "
                                         "the end of a step), then evaluate and save as at the last step; the "
                                         "learning-rate schedule stays the planned one. tailor auto's trials use it "
                                         "to keep the budget")
    batch_size: PositiveInt = Field(8, description="Samples per optimizer step (times grad_accum); larger is smoother "
                                                    "and needs more memory")
    grad_accum: PositiveInt = 1
    lr: Optional[float] = Field(None, gt=0, description="Peak learning rate; by method when absent (lora 2e-4, full 2e-5)")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    seed: int = 42
    eval_every: int = Field(25, ge=0, description="Validation loss every N optimizer steps (0: only at the end)")
    eval_at_start: bool = Field(True, description="With eval_every: evaluate the base model before the first step too, the curve's starting point")
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    packing: Literal["auto", "on", "off"] = Field("auto", description="Lay each batch's samples end to end in one row: no padding, attention kept within samples. auto: on CUDA; on CPU padded rows that share their prompt opening measure faster")
    compile: Literal["auto", "on", "off"] = Field("auto", description="torch.compile the decoder layers (fused kernels); auto: on CUDA, for LoRA-like methods always, for full fine-tuning from 2M training tokens on, where the compile time pays back (BENCHMARKS.md)")
    micro_batch_tokens: Optional[PositiveInt] = Field(None, description="With packing (ignored without): regroup each optimizer step's samples (batch_size x grad_accum) into micro-batches of up to this many tokens per process; fewer, fuller micro-batches, the same update")
    gradient_checkpointing: bool = Field(False, description="Recompute layer activations in backward: much less memory, ~30% more compute")
    checkpoint_every: Optional[PositiveInt] = Field(None, description="Save a resumable checkpoint every N optimizer steps; at every evaluation when absent")
    keep_checkpoints: PositiveInt = Field(2, description="Most recent checkpoints kept (the best one is always kept too)")
    distributed: DistSpec = Field(default_factory=DistSpec, description="Used when started by torchrun; batch_size stays the global batch, so results do not depend on the process count")


class SelectSpec(Section):
    metric: str = Field("val_loss", description="What picks the best checkpoint: val_loss, or a task metric on generated validation text ('task/metric', or just the metric when one task measures it: accuracy, macro_f1, f1, exact_match, bleu, ...). Unset, a run of one open-answer task (ner, qa, translation, math, instruction, chat) selects on its headline metric, others on val_loss")
    patience: Optional[PositiveInt] = Field(None, description="Stop after this many evaluations without improvement (early stopping); never when absent")
    min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as an improvement; a checkpoint within it of the best is a tie, which the lower validation loss wins")
    restore_best: bool = Field(True, description="Evaluate and save the best checkpoint's weights, not the last")


class RetentionSpec(Section):
    data: Optional[str] = Field("builtin:general", description="General instruction data whose perplexity shows what the model forgets: builtin:general, or a JSON/JSONL file of instruction/input/output or chat records; null turns retention off")
    limit: PositiveInt = Field(64, description="Examples of the retention set used")
    max_increase: float = Field(0.25, gt=0, description="Guardrail: relative rise of retention perplexity over the base model (0.25 = +25%)")
    action: Policy = Field("warn", description="warn, error (stop the run, keep the last checkpoint) or ignore when the guardrail trips")
    generate: bool = Field(False, description="Also generate answers for the retention set at the end and score them with ROUGE-L")


class EvalSpec(Section):
    baselines: list[Literal["zero_shot", "few_shot"]] = Field(
        ["zero_shot", "few_shot"], description="Prompting baselines of the base model on the test split; the k-shot "
                                               "curve (eval.few_shot_k) and the classic classifier (eval.classic) "
                                               "are set apart")
    few_shot_k: list[NonNegativeInt] = Field([0, 1, 3, 6], description="The k-shot curve: prompting measured with k "
                                             "demonstrations from the training split for each k; the largest is the few-shot baseline. "
                                             "A single number is read as [0, k]")
    prompting: list[Literal["free", "constrained", "likelihood"]] = Field(
        ["free", "constrained", "likelihood"], description="How prompting baselines answer a closed label set: free "
        "generation, decoding constrained to the labels, and label log-likelihood (the most likely label's completion). "
        "NER lists are free or constrained (to the text's own spans under each type). The fine-tuned model is compared with "
        "the best of them; open-answer tasks always generate freely")
    # auto asks a base model for lists: prompted on WNUT-17's 200-sentence sample, SmolLM2's best list answers
    # scored a strict entity F1 of 0.065 and its inline copies 0.000 (Gemma-3-270M's 0.008, BENCHMARKS.md), so
    # prompting in the training format (inline by default) would not be prompting at its best.
    prompting_entity_format: Literal["auto", "list", "inline", "json"] = Field(
        "auto", description="ner: the answer format the prompting baselines ask for. auto: list when prompting a base "
        "model with the preset's own template (base models answer lists far better than they copy a sentence with "
        "marks); the training format (template.entity_format) when the model is a finished run or the config writes "
        "its own instruction, prompt or completion. The fine-tuned model always answers in the training format")
    demos: Literal["random", "similar"] = Field("random", description="Few-shot demonstrations: random (balanced over "
                                                "labels, the same for every row) or similar (each row's k nearest training "
                                                "examples by TF-IDF cosine)")
    curve_rows: Optional[PositiveInt] = Field(100, description="Test rows scored at the intermediate k values of the curve "
                                              "(label likelihood); None: all. The end points use the whole test split")
    max_prompt_tokens: PositiveInt = Field(2048, description="Longest prompt a baseline may use: demonstrations that would "
                                           "make it longer are dropped, and the count is reported")
    classic: bool = Field(True, description="Also train TF-IDF + logistic regression on the training split (closed "
                                            "label sets), to show what a classic classifier does")
    example_losses: bool = Field(True, description="After training, score every training example under the final "
                                 "model and list the highest losses (often mislabeled rows): one forward pass over "
                                 "the training split, about a third of an epoch's time. A search's trials (tailor "
                                 "auto) set false: on a short trial it costs as much as the training")
    test: bool = Field(True, description="Score the test split at the end (and the baselines on it). A search's trials "
                                         "(tailor auto) set false: they are chosen on validation, and the test split "
                                         "is read once, for the winner")

    @field_validator("few_shot_k", mode="before")
    @classmethod
    def _curve(cls, value):
        """`few_shot_k: 3` (the form before the curve existed) is the curve [0, 3]; a list is sorted, deduplicated."""
        values = [0, value] if isinstance(value, int) and not isinstance(value, bool) else value
        if isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            values = sorted(set(values))
            if not values:
                raise ValueError("needs at least one k")
        return values
    batch_size: PositiveInt = 16
    max_new_tokens: Optional[PositiveInt] = Field(None, description="By default the longest label plus 16 tokens, room for a sentence")
    decoding: Literal["free", "constrained", "auto"] = Field("free", description="How the fine-tuned model answers: free: greedy text, normalised to a label; constrained: greedy within the label set, NER's answers of the text's own spans, extractive QA's span of the context (both kinds are then scored on test); auto: both are scored on test, and the one that scores higher on the validation answers is the fine-tuned headline")
    static_cache: Optional[bool] = Field(None, description="Generate on transformers' static key/value cache, whose "
                                         "decoding step the library compiles into CUDA graphs, one per shape: several "
                                         "times faster on a GPU, where a small model's step is launch-bound. None: on a "
                                         "CUDA device, for generation calls of at least 256 decoding steps "
                                         "(batches x new tokens), models that are not quantized and rows within "
                                         "the attention window")
    during_training: int = Field(32, ge=0, description="Validation examples generated and scored at each evaluation during training (0: loss only)")
    select: SelectSpec = SelectSpec()
    retention: RetentionSpec = RetentionSpec()


class PreflightSpec(Section):
    leakage: Policy = Field("warn", description="Validation/test prompts that also occur (exactly or nearly) in train")
    duplicates: Policy = Field("warn", description="The same prompt and answer more than once inside a split")
    empty: Policy = Field("error", description="An example whose rendered prompt or answer is empty")
    imbalance: Policy = Field("warn", description="Largest/smallest train label count over max_imbalance")
    single_label: Policy = Field("error", description="The training split holds a single label (classification): the model can only learn to repeat it, and its score is trivial. When lowered, the report marks the score as trivial")
    max_imbalance: float = Field(10.0, gt=1)
    truncation: Policy = Field("warn", description="Samples truncated or dropped to fit template.max_length")
    identical_pairs: Policy = Field("warn", description="Preference pairs whose chosen and rejected answers are identical once whitespace is collapsed: they teach nothing and are left out of training (a split of nothing else is always an error). Pairs that nearly match (only case or punctuation differs, or similarity >= near_identical_pairs) are a warning unless this is ignore")
    near_identical_pairs: float = Field(0.95, gt=0, le=1, description="difflib similarity of a pair's two answers at which preflight calls them nearly identical")
    near_duplicate_jaccard: float = Field(0.85, gt=0, le=1, description="Word 3-gram Jaccard at which two texts are near duplicates")
    max_near_rows: PositiveInt = Field(20000, description="Near-duplicate search is skipped for splits larger than this")


class TrackSpec(Section):
    tensorboard: bool = Field(True, description="TensorBoard event files in <run>/tensorboard/")
    mlflow: bool = Field(False, description="Also log params, metrics and artifacts to MLflow (pip install tailorlm[mlflow])")
    mlflow_uri: Optional[str] = Field(None, description="MLflow tracking URI; a SQLite store beside the run directory (runs/mlflow.db) when absent")
    experiment: Optional[str] = Field(None, description="MLflow experiment name; output.name when absent")


class OutputSpec(Section):
    dir: Optional[str] = Field(None, description="Run directory; runs/<name>-<timestamp> when absent")
    name: str = Field("run", description="Names the run: its folder is runs/<name>-<timestamp>")
    overwrite: bool = False


class TaskSpec(Section):
    """One task of a multi-task run: its own data, template (preset) and evaluation."""
    name: str = Field(description="Names the task in logs, metrics.json and the report")
    data: DataSpec
    template: TemplateSpec = TemplateSpec()
    weight: float = Field(1.0, gt=0, description="Share of training samples under mixing.strategy=weights")


class MixSpec(Section):
    strategy: Literal["temperature", "weights", "proportional"] = Field(
        "temperature", description="How tasks share the training set (tailorlm/data/mixing.py)")
    temperature: float = Field(2.0, gt=0, description="Shares proportional to size^(1/T)")


class RunConfig(Section):
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    template: TemplateSpec = TemplateSpec()
    method: MethodSpec = MethodSpec()
    objective: ObjectiveSpec = ObjectiveSpec()
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    preflight: PreflightSpec = PreflightSpec()
    tasks: list[TaskSpec] = Field(default_factory=list, description="Multi-task: when given, replaces data and template")
    mixing: MixSpec = MixSpec()
    track: TrackSpec = TrackSpec()
    output: OutputSpec = OutputSpec()

    @property
    def lr(self) -> float:
        if self.train.lr is not None:
            return self.train.lr
        return DEFAULT_LR[self.method.name] * self.objective.lr_scale

    def task_set(self) -> list[TaskSpec]:
        """Every task of the run: the `tasks` list, or the run's own data and template as one task named after
        its preset. The rest of the code treats a single-task run as a task set of one."""
        return list(self.tasks) or [TaskSpec(name=self.template.preset, data=self.data, template=self.template)]

    def for_task(self, task: TaskSpec) -> RunConfig:
        """This config with one task's data and template in place of the run's own."""
        return self.model_copy(update={"data": task.data, "template": task.template})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

