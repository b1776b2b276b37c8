"""`tailor run` end to end on a tiny random model (seconds), and every bad-input path through the CLI."""
import json
import re

import pytest
import yaml

from tailorlm.cli import main
from tailorlm.eval.results import TaskResults
from tailorlm.tasks.ner import parse_entities
from conftest import labeled_csv, write

FAST = ["train.max_steps=3", "train.batch_size=4", "train.eval_every=2", "eval.few_shot_k=2", "template.max_length=96"]


def cli(*args) -> int:
    return main(["run", *map(str, args)])


def test_run_writes_a_complete_output_directory(tmp_path, tiny_model_dir, capsys):
    data = labeled_csv(tmp_path / "reviews.csv")
    out = tmp_path / "out"
    assert cli(f"model.path={tiny_model_dir}", f"data.train={data}", "--output", out, *FAST) == 0
    for name in ("config.yaml", "metrics.json", "predictions.jsonl", "report.md", "loss_curve.png",
                 "tasks/classification/data_report.json", "tasks/classification/preflight.json", "train_log.json",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    written = json.loads((out / "metrics.json").read_text())
    # a run is a list of tasks: the single task's section, named after its preset
    assert written["schema"] == 2 and list(written["tasks"]) == ["classification"]
    metrics = written["tasks"]["classification"]
    prompting = {f"{base}{kind}" for base in ("zero_shot", "few_shot") for kind in ("", "_constrained", "_likelihood")}
    assert set(metrics["variants"]) == prompting | {"majority", "classic", "fine_tuned"}
    for name, variant in metrics["variants"].items():
        assert {"accuracy", "macro_f1", "valid", "kind", "k", "prompt_tokens", "seconds_per_100",
                "dropped_demos"} | ({"confusion"} if name != "majority" else set()) <= set(variant)
    assert metrics["variants"]["few_shot_likelihood"]["k"] == 2 and metrics["variants"]["zero_shot"]["k"] == 0
    assert metrics["variants"]["zero_shot_likelihood"]["valid"] == 1.0  # a label is always chosen
    best = metrics["best_prompting"]
    assert best["value"] == max(metrics["variants"][v]["accuracy"] for v in prompting)
    assert [p["k"] for p in metrics["curve"]["points"]] == [0, 2] and metrics["curve"]["kind"] == "likelihood"
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    n_test = metrics["n_test"]
    assert len(predictions) == 8 * n_test
    assert {"input", "expected", "predicted", "variant"} <= set(predictions[0])
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
    report = (out / "report.md").read_text()
    assert "| fine-tuned |" in report and "loss_curve.png" in report
    assert "![k-shot curve](tasks/classification/k_shot_curve.png)" in report
    assert "vs prompting: against the best prompting result" in report
    assert "- constrained and likelihood rows: both read off one scoring pass of every label" in report
    assert all(metrics["variants"][f"{base}_{kind}"]["shared_pass"] for base in ("zero_shot", "few_shot")
               for kind in ("constrained", "likelihood"))
    assert (out / "tasks" / "classification" / "k_shot_curve.png").is_file()
    log = json.loads((out / "train_log.json").read_text())
    assert [r["step"] for r in log["val_loss"]] == [0, 2, 3]
    # the validation curve holds the task's figures; what an answer cost (prompt tokens, seconds) is not one
    task_keys = {"classification/accuracy", "classification/macro_f1", "classification/valid"}
    assert all(task_keys <= set(e) and not {"classification/prompt_tokens", "classification/seconds_per_100"} & set(e)
               for e in log["evaluations"])
    lines = capsys.readouterr().out.splitlines()
    # into a file or pipe: one line per finished progress, named short enough for an 80-column log
    assert [line.split(":")[0] for line in lines if line.startswith("eval zero_shot")] == \
        ["eval zero_shot (free, constrained, likelihood)"]
    assert any(line.startswith("train: 3/3 in 0:") for line in lines)
    printed = [line for line in lines if line.startswith("step ")]
    assert [line.split(":")[0] for line in printed] == ["step 0/3", "step 2/3", "step 3/3"]
    first = log["evaluations"][0]
    assert printed[0] == (f"step 0/3: val_loss {first['val_loss']:.3f}; classification: accuracy "
                          f"{first['classification/accuracy']:.3f}, macro_f1 {first['classification/macro_f1']:.3f}, "
                          f"valid {first['classification/valid']:.3f}; retention ppl "
                          f"{first['retention_ppl']:.2f} (+0%)  (base model)")


def test_a_contaminated_and_trivial_test_score_is_marked_everywhere(tmp_path, tiny_model_dir, capsys):
    """Three of four test rows are training rows, and every test label is the same: metrics.json, report.md and
    the terminal table say so instead of presenting the score as a result."""
    train = labeled_csv(tmp_path / "reviews.csv")
    copied = [line for line in train.read_text().splitlines() if line.endswith(",positive")][:3]
    test = write(tmp_path / "test.csv", "\n".join(["text,label", *copied, "the team won the match,positive"]) + "\n")
    validation = write(tmp_path / "val.csv", "text,label\nthe market rose,positive\nthe phone failed,negative\n")
    out = tmp_path / "out"
    assert cli(f"model.path={tiny_model_dir}", f"data.train={train}", f"data.validation={validation}",
               f"data.test={test}", "--output", out, *FAST) == 0
    metrics = json.loads((out / "metrics.json").read_text())["tasks"]["classification"]
    assert metrics["contamination"] == {"test_rows": 4, "in_train": 3, "share": 0.75, "exact": 3, "near": 0,
                                        "near_checked": True}
    assert metrics["trivial"] == ["every test example has the label 'positive', so always answering it scores 1.000"]
    notes = ["test score trivial: every test example has the label 'positive', so always answering it scores 1.000",
             "test score contaminated: 3 of 4 test rows (75%) also occur in train"]
    report = (out / "report.md").read_text()
    assert all(f"- **{note}**" in report for note in notes)
    assert "| trivial |" in report
    printed = capsys.readouterr().out.splitlines()
    table_end = max(i for i, line in enumerate(printed) if line.startswith("└"))
    first = printed.index(notes[0])
    assert table_end < first < table_end + 4 and printed[first:first + 2] == notes  # right under the table


def test_full_fine_tuning_saves_a_loadable_model(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    data = labeled_csv(tmp_path / "reviews.csv")
    out = tmp_path / "out"
    assert cli(f"model.path={tiny_model_dir}", f"data.train={data}", "method.name=full", "eval.baselines=[]",
               "--output", out, *FAST) == 0
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.vocab_size > 0
    assert set(json.loads((out / "metrics.json").read_text())["tasks"]["classification"]["variants"]) == {"fine_tuned"}


@pytest.mark.parametrize("preset", ["ner", "qa", "translation", "math"])
def test_other_task_presets_run_end_to_end(tmp_path, tiny_model_dir, preset, capsys):
    """Open-answer tasks: no label set, the preset's metrics in metrics.json and in the report's table."""
    if preset == "ner":
        data = tmp_path / "d.conll"
        data.write_text("".join(f"the\tO\nfilm\tB-product\n{w}\tO\n\n" for w in ("won", "rose", "fell") * 8))
        args, keys = [f"data.train={data}", "eval.decoding=auto"], {"f1", "precision", "recall"}
    elif preset == "qa":  # extractive: every answer is a span of its context
        data = tmp_path / "q.jsonl"
        rows = [{"question": f"Who won in {y}?", "context": f"In {y} the team won the cup .", "answer": "the team"}
                for y in range(1990, 2014)]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        args, keys = [f"data.train={data}"], {"exact_match", "token_f1"}
    elif preset == "translation":
        src, tgt = tmp_path / "s.txt", tmp_path / "t.txt"
        src.write_text("the film won\nthe team won\n" * 12)
        tgt.write_text("der film gewann\ndas team gewann\n" * 12)
        args, keys = [f"data.train={src}|{tgt}"], {"bleu", "chrf"}
    else:
        data = tmp_path / "m.jsonl"
        data.write_text('{"question": "2 plus 3?", "answer": "2+3=5\\n#### 5"}\n' * 24)
        args, keys = [f"data.train={data}"], {"exact_match", "answered"}
    out = tmp_path / "out"
    # The default job's config sets a classification instruction and prompt: null gives the preset's.
    assert cli(f"model.path={tiny_model_dir}", *args, f"template.preset={preset}", "template.instruction=null",
               "template.prompt=null", "eval.max_new_tokens=6", "--output", out, *FAST, "template.max_length=400") == 0
    metrics = json.loads((out / "metrics.json").read_text())["tasks"][preset]
    assert metrics["task"] == preset and metrics["headline"] in keys
    for variant in metrics["variants"].values():
        assert keys <= set(variant)
    assert "| fine-tuned |" in (out / "report.md").read_text()
    # the kinds the tables hold: NER's answers can be constrained to its spans; open answers generate freely
    kinds = "free, constrained" if preset in ("ner", "qa") else "free"
    assert f"- **prompting:** greedy; {kinds}; k-shot curve" in (out / "report.md").read_text()
    assert ("zero_shot_constrained" in metrics["variants"]) == (preset in ("ner", "qa"))
    # open answers: the checkpoint is chosen on the task's own metric on validation answers, not its loss
    headline = {"ner": "f1", "qa": "exact_match", "translation": "bleu", "math": "exact_match"}[preset]
    assert yaml.safe_load((out / "config.yaml").read_text())["eval"]["select"]["metric"] == f"{preset}/{headline}"
    if preset == "ner":  # extraction's classic model is a CRF tagger, and the report gives F1 per entity type
        assert metrics["variants"]["classic"]["kind"] == "crf"
        assert set(metrics["variants"]["fine_tuned"]["per_type"]) <= {"product"}
        assert "Entity F1 per type (strict spans):" in (out / "report.md").read_text()
        # the base model is asked for lists (eval.prompting_entity_format: auto), the fine-tuned model copies the
        # sentence with marks (the training format); both are read back and scored on the same sentences
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        by_variant = {v: [r for r in rows if r["variant"] == v] for v in ("zero_shot_constrained", "fine_tuned")}
        assert [r["input"] for r in by_variant["zero_shot_constrained"]] == [r["input"] for r in by_variant["fine_tuned"]]
        for prompted, tuned in zip(by_variant["zero_shot_constrained"], by_variant["fine_tuned"]):
            assert prompted["expected"] == "product: film" and tuned["expected"].startswith("the [film | product] ")
            # list-constrained: each span read back is a run of the sentence's own words
            words = prompted["input"].split()
            runs = {" ".join(words[i:j]) for i in range(len(words)) for j in range(i + 1, len(words) + 1)}
            assert all(span in runs for _, span in parse_entities(prompted["generated"], ["product"], "list"))
        # the CRF writes its answers as the fine-tuned model does
        assert all(r["expected"].startswith("the [film | product] ") for r in rows if r["variant"] == "classic")
        assert "entities asked for as list (eval.prompting_entity_format)" in (out / "report.md").read_text()
        # the stage's rule stays short; the asked format is a line of its own, whole in an 80-column log
        printed = capsys.readouterr().out
        assert "Prompting baselines: ner (base model)" in printed
        assert "\nentities asked for as list (eval.prompting_entity_format)\n" in printed
        # eval.decoding=auto: both kinds on test, validation's choice is the fine-tuned headline
        chosen = metrics["decoding"]
        assert {"fine_tuned", "fine_tuned_constrained"} <= set(metrics["variants"]) and chosen["rows"] > 0
        assert chosen["chosen"] == ("fine_tuned_constrained" if chosen["validation"]["constrained"] >
                                    chosen["validation"]["free"] else "fine_tuned")
        assert "- fine-tuned answers: fine-tuned" in (out / "report.md").read_text()
        assert TaskResults.from_json(metrics).fine_tuned == metrics["variants"][chosen["chosen"]]["f1"]
        # ... and tailor predict answers the way validation chose, as the manifest records
        kind = "constrained" if chosen["chosen"] == "fine_tuned_constrained" else "free"
        assert json.loads((out / "manifest.json").read_text())["tasks"]["ner"]["decoding"] == kind
        assert main(["predict", str(out), str(data), "-o", str(tmp_path / "p.jsonl"), "--device", "cpu"]) == 0
        tested = {p["input"]: p["generated"] for p in map(json.loads, (out / "predictions.jsonl").open())
                  if p["variant"] == chosen["chosen"]}
        predicted = {p["input"]: p["generated"] for p in map(json.loads, (tmp_path / "p.jsonl").open())}
        assert tested and all(predicted[text] == answer for text, answer in tested.items())
    if preset == "qa":  # extractive QA: a lexical span matcher as its classic model, constrained answers are spans
        assert metrics["variants"]["classic"]["kind"] == "sliding window"
        spans = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        constrained = [p for p in spans if p["variant"] == "zero_shot_constrained"]
        for p in constrained:  # each one a run of its own context's words
            year = re.search(r"(19|20)\d\d", p["input"]).group()
            context = f"In {year} the team won the cup .".split()
            answer = p["generated"].split()
            assert answer and any(context[i:i + len(answer)] == answer for i in range(len(context))), p


def test_multi_task_run_reports_every_task(tmp_path, tiny_model_dir):
    reviews = labeled_csv(tmp_path / "reviews.csv")
    src, tgt = tmp_path / "s.txt", tmp_path / "t.txt"
    src.write_text("the film won\nthe team won\n" * 12)
    tgt.write_text("der film gewann\ndas team gewann\n" * 12)
    config = write(tmp_path / "multi.yaml", f"""
model: {{path: {tiny_model_dir}}}
tasks:
  - name: sentiment
    data: {{train: {reviews}}}
    template: {{max_length: 96}}
  - name: german
    data: {{train: "{src}|{tgt}"}}
    template: {{preset: translation, max_length: 96}}
    weight: 3
mixing: {{strategy: weights}}
train: {{max_steps: 2, batch_size: 4, eval_every: 0}}
eval: {{few_shot_k: 1, max_new_tokens: 4}}
""")
    out = tmp_path / "out"
    assert cli(config, "--output", out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"sentiment", "german"} and metrics["mixing"]["strategy"] == "weights"
    assert {"accuracy", "macro_f1"} <= set(metrics["tasks"]["sentiment"]["variants"]["fine_tuned"])
    assert {"bleu", "chrf"} <= set(metrics["tasks"]["german"]["variants"]["zero_shot"])
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {p["task"] for p in predictions} == {"sentiment", "german"}
    report = (out / "report.md").read_text()
    assert "Prompting vs fine-tuning: sentiment" in report and "Prompting vs fine-tuning: german" in report
    assert (out / "tasks" / "german" / "preflight.json").is_file()



def test_a_chat_task_trains_beside_a_classification_task(tmp_path, tiny_model_dir, capsys):
    """Multi-turn conversations (one with a tool call and a reply of weight 0) next to a labeled table: the chat
    task is scored on each held-out conversation's final reply, against zero-shot prompting only."""
    reviews = labeled_csv(tmp_path / "reviews.csv")
    call = {"type": "function", "function": {"name": "topic", "arguments": '{"text": "the match"}'}}
    talks = []
    for i in range(24):
        talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "weight": 0},
                {"role": "user", "content": f"the film won {i}"}, {"role": "assistant", "content": "good film"}]
        if i % 4 == 0:
            talk += [{"role": "user", "content": "topic?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "content": "sport"}, {"role": "assistant", "content": "sport"}]
        talks.append({"messages": talk})
    chats = write(tmp_path / "talks.jsonl", "\n".join(json.dumps(t) for t in talks))
    config = write(tmp_path / "multi.yaml", f"""
model: {{path: {tiny_model_dir}}}
tasks:
  - name: sentiment
    data: {{train: {reviews}}}
    template: {{max_length: 96}}
  - name: talk
    data: {{train: {chats}}}
    template: {{preset: chat, max_length: 96}}
train: {{max_steps: 2, batch_size: 4, eval_every: 0}}
eval: {{few_shot_k: 1, max_new_tokens: 4}}
""")
    out = tmp_path / "out"
    assert cli(config, "--output", out) == 0
    talk = json.loads((out / "metrics.json").read_text())["tasks"]["talk"]
    assert set(talk["variants"]) == {"zero_shot", "fine_tuned"} and talk["headline"] == "rouge_l"
    assert all(v["k"] == 0 and v["call_match"] is None for v in talk["variants"].values()) and not talk.get("curve")
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    chat_rows = [p for p in predictions if p["task"] == "talk"]
    assert chat_rows and {p["expected"] for p in chat_rows} <= {"good film", "sport"}
    assert all(p["input"].startswith("user: hi\nassistant: hello\nuser: the film won") for p in chat_rows)
    report = (out / "report.md").read_text()
    assert "Prompting vs fine-tuning: talk" in report and "call_match" not in report
    replies = json.loads((out / "tasks" / "talk" / "preflight.json").read_text())["replies"]
    assert replies["trained"] > 0 and replies["keyboard_mash"] == 0
    capsys.readouterr()
    assert main(["predict", str(out), str(chats), "--task", "talk", "-o", str(tmp_path / "p.jsonl")]) == 2
    assert "for a model trained on conversations use `tailor chat RUN` or `tailor serve RUN`" in capsys.readouterr().out

def _bad_jsonl(p):
    lines = ['{"text": "a", "label": "x"}'] * 3 + ["{oops"]
    return [f"data.train={write(p / 'b.jsonl', chr(10).join(lines))}"]


@pytest.mark.parametrize("setup, message", [
    (lambda p: [f"data.train={p / 'missing.csv'}"], "missing.csv: file not found"),
    (lambda p: [f"data.train={write(p / 'd.csv', 'txt,label' + chr(10) + 'a,b' + chr(10))}"],
     "d.csv: no column 'text' (did you mean 'txt'?)"),
    (lambda p: [f"data.train={write(p / 'e.csv', '')}"], "e.csv: no data rows"),
    (lambda p: [f"data.train={labeled_csv(p / 'd.csv')}", "template.completion=answer"],
     "template.completion must use {{ label }}"),
    (_bad_jsonl, "b.jsonl, line 4: invalid JSON"),
    (lambda p: ["train.lr=-1", "method.nme=full"], "2 problem(s) in the config"),
    (lambda p: [f"data.train={labeled_csv(p / 'd.csv')}", f"model.path={p / 'nope.gguf'}"], "GGUF file not found"),
])
def test_bad_input_exits_nonzero_with_a_clear_message_and_no_output(tmp_path, capsys, tiny_model_dir, setup, message):
    out = tmp_path / "out"
    code = cli(f"model.path={tiny_model_dir}", "--output", out, *FAST, *setup(tmp_path))
    printed = " ".join(capsys.readouterr().out.split())
    assert code == 2
    assert message in printed
    assert not out.exists()  # nothing was created, let alone anything that looks complete


def test_existing_output_directory_is_not_overwritten(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    write(out / "keep.txt", "results of another run")
    code = cli(f"model.path={tiny_model_dir}", f"data.train={labeled_csv(tmp_path / 'd.csv')}", "--output", out, *FAST)
    assert code == 2
    assert "already exists and is not empty" in capsys.readouterr().out
    assert (out / "keep.txt").read_text() == "results of another run"


def test_print_config_shows_the_resolved_spec(capsys):
    assert main(["run", "--print-config", "train.lr=0.001"]) == 0
    text = capsys.readouterr().out
    assert "lr: 0.001" in text and "train: builtin:bbc_news" in text


def test_failure_mid_run_marks_the_directory_failed(tmp_path, tiny_model_dir, monkeypatch):
    import tailorlm.pipeline.stages as stages

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(stages, "fit", boom)
    out = tmp_path / "out"
    assert cli(f"model.path={tiny_model_dir}", f"data.train={labeled_csv(tmp_path / 'd.csv')}", "--output", out,
               "eval.baselines=[]", *FAST) == 1  # an unexpected failure: one line, exit 1 (--debug re-raises)
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "failed" and status["error"] == "disk full"
    assert not (out / "metrics.json").exists()


def test_extraction_prompting_asks_base_models_for_lists_unless_told_or_the_template_is_the_users():
    from tailorlm.config import RunConfig
    from tailorlm.pipeline.stages import prompting_entity_format

    def asked(started=False, **settings):
        eval_ = {"prompting_entity_format": settings.pop("asked")} if "asked" in settings else {}
        return prompting_entity_format(RunConfig(template={"preset": "ner", **settings}, eval=eval_), started)

    assert asked() == "list"  # inline training, a base model prompted in the format it answers best
    assert asked(started=True) is None  # a finished run answers in the format it was trained on
    assert asked(instruction="Mark the names.") is None and asked(completion="{{ entities_text }}") is None
    assert asked(entity_format="list") is None  # already the training format
    assert asked(asked="json") == "json" and asked(asked="inline") is None
    assert prompting_entity_format(RunConfig(), False) is None  # classification has no entity format


def test_extraction_prompting_in_lists_shows_its_demonstrations_in_lists(tmp_path, tiny_model_dir):
    """The base model asked for lists sees list answers in its demonstrations, and the same test sentences."""
    from tailorlm.config import load_config
    from tailorlm.eval.evaluate import Evaluator
    from tailorlm.pipeline.prepare import prepare
    from tailorlm.pipeline.stages import _asked_in

    data = tmp_path / "d.conll"
    data.write_text("".join(f"the\tO\nfilm\tB-product\n{w}\tO\n\n" for w in ("won", "rose", "fell") * 8))
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"data.train={data}", "template.preset=ner",
                             "template.instruction=null", "template.prompt=null", "template.max_length=400"])
    prepared = prepare(cfg)
    task = prepared.tasks["ner"]
    scorer = Evaluator(prepared.tokenizer, task.template, task.fmt, task.labels, cfg.eval, "cpu", None)
    evaluator, test, train = _asked_in("list", task, scorer)
    assert [s.example["tokens"] for s in test] == [s.example["tokens"] for s in task.encoded["test"]]
    prompts, _ = evaluator.prompts(test[:1], train[:2])
    text = prepared.tokenizer.decode(prompts[0])
    assert text.count("product: film") == 2 and "[film | product]" not in text and "as 'type: entity'" in text


def test_a_resumed_run_reuses_its_baselines_only_when_they_asked_in_the_same_formats(tmp_path, monkeypatch):
    from tailorlm.pipeline import runner, stages
    from tailorlm.rundir import RunDir

    run_dir = RunDir(tmp_path)
    saved = stages.Baselines({"ner": {"zero_shot": {"f1": 0.1}}}, [], {"ner": {}}, {"ner": "list"})
    run_dir.write("baselines.json", saved.to_json())
    measured = stages.Baselines({"ner": {"zero_shot": {"f1": 0.2}}}, [], {"ner": {}}, {"ner": "json"})
    monkeypatch.setattr(stages, "baselines", lambda *a: measured)
    monkeypatch.setattr(stages, "asked_formats", lambda prepared: {"ner": "list"})
    assert runner._baselines(None, run_dir, None, {}).variants == saved.variants  # the same formats: reused
    monkeypatch.setattr(stages, "asked_formats", lambda prepared: {"ner": "json"})
    assert runner._baselines(None, run_dir, None, {}) is measured  # asked otherwise now: measured anew, and saved
    assert run_dir.read("baselines.json")["asked"] == {"ner": "json"}
