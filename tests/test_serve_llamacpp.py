"""`tailor serve --engine llamacpp`: a GGUF in llama.cpp behind the same engine and API as the PyTorch model.

A tiny Llama is exported to an f16 GGUF; both engines then answer the same prompts, and greedy answers must be
the same text, the same token counts and the same finish reasons, streamed or not, through the HTTP API too."""
import pytest
from openai import OpenAI

from family_models import tiny_family_model
from test_families import _layout
from tailorlm.config import RunConfig
from tailorlm.data.tokenize import ChatFormat
from tailorlm.errors import TailorError
from tailorlm.export.gguf_writer import write_gguf
from tailorlm.serve.engine import Engine
from tailorlm.serve.jobs import Sampling
from tailorlm.serve.server import BackgroundServer, create_app

pytest.importorskip("llama_cpp", reason="--engine llamacpp needs llama-cpp-python")

QUESTIONS = ["the market rose as shares in the bank climbed", "the film won an award", "sport"]


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_tokenizer):
    from tailorlm.serve.llamacpp import LlamaCppEngine

    model = tiny_family_model("llama", len(tiny_tokenizer)).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(model, tiny_tokenizer, path, "f16", "", _layout(tiny_tokenizer))
    fmt = ChatFormat(tiny_tokenizer, RunConfig().template)
    pytorch, llamacpp = Engine(model, tiny_tokenizer, fmt, "cpu"), LlamaCppEngine(path, tiny_tokenizer, fmt, threads=2)
    yield pytorch, llamacpp
    pytorch.close()
    llamacpp.close()


def _prompt(engine, question: str) -> list[int]:
    return engine.chat_prompt([{"role": "user", "content": question}])


def test_greedy_answers_are_the_pytorch_engines(engines):
    pytorch, llamacpp = engines
    assert llamacpp.max_batch == 1 and llamacpp.vocab_size == pytorch.vocab_size
    for question in QUESTIONS:
        ids = _prompt(pytorch, question)
        assert _prompt(llamacpp, question) == ids  # the same tokenizer and chat format
        expected = pytorch.complete(ids, Sampling(12))
        got = llamacpp.complete(ids, Sampling(12))
        assert got == expected and got.completion_tokens == 12 and got.finish_reason == "length"
        assert len(got.text) > 10


def test_streamed_text_and_stop_strings_match_too(engines):
    pytorch, llamacpp = engines
    ids = _prompt(pytorch, QUESTIONS[0])
    full = pytorch.complete(ids, Sampling(12)).text
    stream = llamacpp.stream(ids, Sampling(12))
    assert "".join(stream) == full and stream.completion.finish_reason == "length"
    stop = full[5:8]  # a stop string inside the answer: the text before it, finish reason "stop"
    expected = pytorch.complete(ids, Sampling(12, stop=(stop,)))
    got = llamacpp.complete(ids, Sampling(12, stop=(stop,)))
    assert got.text == expected.text == full[:full.index(stop)] and got.finish_reason == "stop"


def test_sampling_with_a_seed_repeats(engines):
    _, llamacpp = engines
    ids = _prompt(llamacpp, QUESTIONS[1])
    a, b = (llamacpp.complete(ids, Sampling(10, temperature=1.0, seed=7)) for _ in range(2))
    assert a == b and a.completion_tokens == 10


def test_a_paused_greedy_run_resumes_to_the_same_answer(engines):
    _, llamacpp = engines
    ids = _prompt(llamacpp, QUESTIONS[2])
    alone = llamacpp.complete(ids, Sampling(12))
    other = _prompt(llamacpp, QUESTIONS[0])
    other_alone = llamacpp.complete(other, Sampling(12))
    llamacpp.slice_tokens, turns = 3, len(llamacpp.batch_sizes)
    try:  # two requests queued together: each pauses for the other every 3 tokens, and resumes from its prefix
        with llamacpp._wake:  # the worker takes neither before both are queued
            first, second = llamacpp.submit(ids, Sampling(12)), llamacpp.submit(other, Sampling(12))
        assert first.result(timeout=60) == alone and second.result(timeout=60) == other_alone
        assert len(llamacpp.batch_sizes) - turns > 2  # they did take turns
    finally:
        llamacpp.slice_tokens = 32


def test_the_http_api_serves_the_gguf(engines):
    pytorch, llamacpp = engines
    expected = pytorch.complete(_prompt(pytorch, QUESTIONS[0]), Sampling(12)).text
    with BackgroundServer(create_app(llamacpp, "tiny.gguf")) as server:
        client = OpenAI(base_url=server.base_url, api_key="none")
        reply = client.chat.completions.create(model="tiny.gguf", max_tokens=12, temperature=0,
                                               messages=[{"role": "user", "content": QUESTIONS[0]}])
    assert reply.choices[0].message.content == expected and reply.usage.completion_tokens == 12


def test_a_run_without_a_gguf_export_or_a_file_that_is_not_gguf_is_refused(tmp_path):
    from tailorlm.serve.llamacpp import load_llamacpp_engine

    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(TailorError, match=r"model.bin: --engine llamacpp serves a .gguf file or a run directory "
                                          r"with a GGUF export"):
        load_llamacpp_engine(str(tmp_path / "model.bin"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(TailorError, match="broken.gguf"):
        load_llamacpp_engine(str(bad))


def test_a_run_is_served_from_its_gguf_export_once_there_is_one(tmp_path_factory, tmp_path, tiny_tokenizer):
    import shutil

    from test_serve_chat import serve_run
    from tailorlm.cli import main
    from tailorlm.models.trained import load_trained
    from tailorlm.serve.llamacpp import load_llamacpp_engine

    run = tmp_path / "served"
    shutil.copytree(serve_run(tmp_path_factory, tiny_tokenizer), run)
    with pytest.raises(TailorError, match=f"{run}: no GGUF export in this run; write one first: "
                                          f"tailor export {run} --format gguf"):
        load_llamacpp_engine(str(run))
    assert main(["export", str(run), "--format", "gguf"]) == 0
    engine, name = load_llamacpp_engine(str(run), threads=2)
    trained = load_trained(run, merge=True)
    pytorch = Engine(trained.model, trained.tokenizer, trained.chat_format(), "cpu")
    try:
        assert name == "served"
        messages = [{"role": "user", "content": QUESTIONS[1]}]
        ids = pytorch.chat_prompt(messages)
        assert engine.chat_prompt(messages) == ids  # the run's system prompt and template, as in training
        assert engine.complete(ids, Sampling(8)) == pytorch.complete(ids, Sampling(8))
    finally:
        engine.close()
        pytorch.close()


def test_logprobs_and_response_format_are_refused_by_name(engines):
    import json
    import urllib.error
    import urllib.request

    _, llamacpp = engines
    asks = [("logprobs", {"logprobs": True}), ("response_format", {"response_format": {"type": "json_object"}})]
    with BackgroundServer(create_app(llamacpp, "tiny.gguf")) as server:
        for param, extra in asks:
            body = {"model": "tiny.gguf", "messages": [{"role": "user", "content": QUESTIONS[0]}], **extra}
            request = urllib.request.Request(f"{server.base_url}/chat/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(request, timeout=30)
            error = json.loads(caught.value.read())["error"]
            assert (caught.value.code, error["param"]) == (400, param)
            assert error["message"] == (f"{param} is not supported by the llama.cpp engine (--engine llamacpp); "
                                        f"serve the run with the PyTorch engine (--engine torch) for it")
