"""The studio's pages' data without a browser: chat with a run as it was trained (a classifier asked with its
input alone, a conversation streamed), export downloads, the Data page's checks, the live progress, and the
facts that help choose (machine, installed models, each setting's help)."""
import io
import json
import shutil
import time
import urllib.request
import zipfile

import pytest

from conftest import labeled_csv
from test_serve_chat import serve_run
from test_studio import start
from tailorlm import ui
from tailorlm.studio.progress import read_progress


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_tokenizer):
    return serve_run(tmp_path_factory, tiny_tokenizer)  # a finished classification run (LoRA), shared


@pytest.fixture
def client(tmp_path, run):
    runs = tmp_path / "runs"
    shutil.copytree(run, runs / "reviews")
    client, server = start(tmp_path)
    yield client
    client.studio.close()
    server.__exit__()


def stream(client, body: dict) -> list[dict]:
    request = urllib.request.Request(client.base + "/api/chat", data=json.dumps(body).encode(), method="POST",
                                     headers={"X-Studio": "1", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        return [json.loads(line) for line in response.read().decode().splitlines()]


def test_a_classifier_is_asked_with_its_input_alone_and_answers_as_tailor_predict_does(client, tmp_path):
    from tailorlm.models.trained import load_trained
    from tailorlm.serve.predict import predict_rows

    setup = client.call("GET", "/api/chat/setup?run=reviews")[1]
    assert setup == {"mode": "task", "preset": "classification", "fields": ["text"],
                     "labels": ["negative", "positive"], "closed": True, "loaded": False}
    review = "a great movie with an award winning actor"
    events = stream(client, {"run": "reviews", "fields": {"text": review}, "constrained": True})
    assert [e.get("event") for e in events[:2]] == ["loading", "answering"]
    answers = {e["side"]: e for e in events[2:]}
    assert set(answers) == {"fine_tuned", "base"} and all(a["done"] for a in answers.values())
    # the same row through `tailor predict`'s path, decoding kept to the labels: the same text and label
    rows = tmp_path / "one.csv"
    rows.write_text(f"text\n{review}\n")
    trained = load_trained(tmp_path / "runs" / "reviews", merge=True)
    expected = predict_rows(trained, str(rows), decoding="constrained")[0][0]
    assert (answers["fine_tuned"]["text"], answers["fine_tuned"]["label"]) == (expected["generated"], expected["predicted"])
    assert answers["base"]["label"] in ("negative", "positive")
    assert client.call("GET", "/api/chat/setup?run=reviews")[1]["loaded"] is True  # loaded once per run
    assert [e.get("event") for e in stream(client, {"run": "reviews", "fields": {"text": review}})[:1]] == ["answering"]


def test_chat_requests_that_cannot_be_answered_say_why(client):
    cases = [({"run": "reviews", "fields": {"text": "  "}}, "chat: write the text to ask the model about"),
             ({"run": "reviews", "fields": {"text": "x", "label": "y"}},
              "chat: label is not an input of this run's template (text)"),
             ({"run": "reviews"}, "chat: write the text to ask the model about"),
             ({"run": "reviews", "fields": ["x"]}, "fields: Input should be a valid dictionary"),
             ({"run": "reviews", "fields": {"text": "x"}, "max_new_tokens": "abc"},
              "max_new_tokens: Input should be a valid integer, unable to parse string as an integer"),
             ({"run": "reviews", "fields": {"text": "x"}, "temperature": 3},
              "temperature: Input should be less than or equal to 2")]
    for body, message in cases:
        assert client.call("POST", "/api/chat", body) == (400, {"error": message}), body


def test_a_conversation_streams_both_sides_piece_by_piece(client, tmp_path):
    from tailorlm.serve.engine import Sampling
    from tailorlm.studio.actions import SideBySide

    pair = SideBySide(tmp_path / "runs" / "reviews", "cpu")
    try:
        messages = [{"role": "user", "content": "a dull film"}]
        events = list(pair.stream_chat(messages, Sampling(12)))
        for side in ("fine_tuned", "base"):
            pieces = [e["piece"] for e in events if e["side"] == side and "piece" in e]
            end = [e for e in events if e["side"] == side and e.get("done")]
            assert len(end) == 1 and len(pieces) >= 2 and "".join(pieces) == end[0]["text"]
            engine = pair.engines[side]
            assert end[0]["text"] == engine.complete(engine.chat_prompt(messages), Sampling(12)).text  # greedy
        # a reader that leaves after the first piece stops both models: nothing keeps generating
        events = pair.stream_chat(messages, Sampling(200))
        next(events)
        events.close()
        deadline = time.monotonic() + 20
        while not all(e.cancelled for e in pair.engines.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(len(e.cancelled) == 1 and e.cancelled[0] < 200 for e in pair.engines.values())
    finally:
        pair.close()


def test_an_export_downloads_file_by_file_or_as_one_zip_and_nothing_else(client, tmp_path):
    folder = tmp_path / "runs" / "reviews" / "export" / "gguf-f16"
    folder.mkdir(parents=True)
    (folder / "model.gguf").write_bytes(b"GGUF" + bytes(range(256)))
    (folder / "Modelfile").write_text("FROM ./model.gguf\n")
    status, body = client.call("GET", "/api/export/reviews/download")
    assert (status, body) == (400, {"error": "reviews has no finished export in this studio: export it first"})
    client.studio.exports["reviews"] = {"state": "verified", "folder": str(folder)}
    with urllib.request.urlopen(client.base + "/api/export/reviews/download?file=model.gguf") as response:
        assert response.read() == (folder / "model.gguf").read_bytes()
        assert 'filename="model.gguf"' in response.headers["content-disposition"]
    with urllib.request.urlopen(client.base + "/api/export/reviews/download") as response:
        archive = zipfile.ZipFile(io.BytesIO(response.read()))
        assert 'filename="reviews-gguf-f16.zip"' in response.headers["content-disposition"]
    assert sorted(archive.namelist()) == ["gguf-f16/Modelfile", "gguf-f16/model.gguf"]
    assert archive.read("gguf-f16/model.gguf") == (folder / "model.gguf").read_bytes()
    for bad in ("../../config.yaml", "/etc/passwd", "nothing.bin"):
        status, body = client.call("GET", f"/api/export/reviews/download?file={urllib.request.quote(bad)}")
        assert (status, body["error"]) == (400, f"{bad}: not a file of the export gguf-f16"), bad
    assert not list(tmp_path.glob("tailor-export-*.zip"))


def test_the_data_page_checks_mappings_and_counts_labels(client, tmp_path):
    rows = labeled_csv(tmp_path / "data" / "source.csv").read_text().replace("text,label", "review,sentiment", 1)
    (tmp_path / "data" / "reviews.csv").write_text(rows + "a late row,positive\n")
    client.draft({"data.train": "reviews.csv", "data.columns.text": "body"})
    table = client.call("GET", "/api/rows")[1]
    assert table["problems"] == ["label has no column mapped, and is not a column of this table: choose its column below",
                                 "text is mapped to 'body', which is not a column of this table: choose its column below"]
    assert table["label_counts"] is None
    client.draft({"data.columns.text": "review", "data.columns.label": "sentiment"})
    table = client.call("GET", "/api/rows")[1]
    assert table["problems"] == [] and table["fields"] == {"label": "sentiment", "text": "review"}
    assert (table["label_column"], table["labels"], table["label_counts"]) == ("sentiment", 2, {"positive": 13, "negative": 12})


def test_a_run_reports_its_stage_and_bars_and_the_live_panel_reads_step_elapsed_and_eta(tmp_path, monkeypatch):
    path = tmp_path / "run.progress.json"
    monkeypatch.setenv(ui.PROGRESS_FILE_ENV, str(path))
    monkeypatch.setattr(ui, "_progress_file", ui._ProgressFile())
    monkeypatch.setattr(ui, "PROGRESS_EVERY_S", 0.0)
    ui.stage("Fine-tuning (lora)")
    with ui.progress("train", 40) as advance:
        advance(10, "loss 1.2")
        state = json.loads(path.read_text())
        assert state["stage"] == "Fine-tuning (lora)"
        assert [(b["description"], b["done"], b["total"], b["info"]) for b in state["bars"]] == [("train", 10, 40, "loss 1.2")]
        with ui.progress("eval validation @10", 8) as inner:
            inner(3)
            assert [b["description"] for b in json.loads(path.read_text())["bars"]] == ["train", "eval validation @10"]
        # the live panel: the training bar is the step counter; time left is the rate so far times the work left
        bar = dict(state["bars"][0], elapsed=30.0)
        path.write_text(json.dumps({**state, "bars": [bar], "updated": time.time()}))
        live = read_progress(path, running=True)
        assert live["step"] == {"done": 10, "total": 40} and live["stage"] == "Fine-tuning (lora)"
        assert live["bars"][0]["eta"] == pytest.approx(90.0, abs=1.0)
        assert read_progress(path, running=False)["bars"][0]["eta"] is None  # a finished run has no time left
    assert json.loads(path.read_text())["bars"] == []
    # a resumed run's bar opens at its step: those steps are counted, but took no time in this process
    with ui.progress("train", 40, done=10) as advance:
        advance(5)
        state = json.loads(path.read_text())
        bar = dict(state["bars"][0], elapsed=30.0)
        assert (bar["done"], bar["start"]) == (15, 10)
        path.write_text(json.dumps({**state, "bars": [bar], "updated": time.time()}))
        assert read_progress(path, running=True)["bars"][0]["eta"] == pytest.approx(150.0, abs=1.0)  # 6 s a step
    assert not list(tmp_path.glob("*.tmp"))
    assert read_progress(tmp_path / "none.json", running=True) is None


def test_the_machine_the_installed_models_and_each_settings_help(client, tmp_path, tiny_model_dir):
    facts = client.call("GET", "/api/machine")[1]
    assert facts["cores"] >= 1 and facts["device"] in ("cpu", "cuda") and isinstance(facts["gpus"], list)
    shutil.copytree(tiny_model_dir, tmp_path / "data" / "models" / "tiny")
    (tmp_path / "data" / "q.gguf").write_bytes(b"GGUF")
    (tmp_path / "data" / "outside").symlink_to(tmp_path / "runs")  # not followed
    models = client.call("GET", "/api/models")[1]["models"]
    listed = [m["path"] for m in models]
    assert listed[-2:] == [str((tmp_path / "data" / "models" / "tiny").resolve()), str((tmp_path / "data" / "q.gguf").resolve())]
    assert listed[:1] in (["default"], [])  # the embedded model, when its package is installed
    help_texts = client.call("GET", "/api/help")[1]
    assert help_texts["train.max_steps"] == "Stop after this many optimizer steps (overrides epochs)"
    for key in ("train.epochs", "train.batch_size", "method.lora.r", "eval.baselines", "output.name", "data.limit.test"):
        assert help_texts[key], key


def test_a_failure_inside_the_chat_stream_is_an_error_event_not_a_dead_connection(client, monkeypatch, caplog):
    from tailorlm.studio import actions

    class Broken:
        def __init__(self, path):
            pass

        def answer_task(self, fields, constrained):
            raise RuntimeError("boom")

        def close(self):
            pass

    monkeypatch.setattr(actions, "SideBySide", Broken)
    events = stream(client, {"run": "reviews", "fields": {"text": "x"}})
    assert events == [{"event": "loading"}, {"event": "answering"},
                      {"event": "error", "error": "unexpected RuntimeError: boom (a tailorlm bug; the studio's "
                                                  "terminal has the details)"}]
    assert any(r.levelname == "ERROR" and r.getMessage() == "POST /api/chat failed" for r in caplog.records)


def test_overlapping_previews_leave_the_terminal_as_they_found_it():
    import threading

    from tailorlm.studio.preview import quiet_console
    from tailorlm.ui import console

    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first():  # enters first, leaves first, while the second is still inside
        with quiet_console():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second():
        first_in.wait(5)
        with quiet_console():
            second_in.set()
            first_out.wait(5)
            assert console.quiet  # still previewing: still quiet

    before = console.quiet
    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert console.quiet is before
