"""The generation engine and `tailor chat` on a real (tiny) run: streaming, history, batching, stop strings.

The conftest tiny model answers every prompt with newlines, which would make "streamed equals greedy" true
of any two strings of newlines; this module's model has larger random weights, so its greedy answers differ
from prompt to prompt. serve_run() builds one real run on it for the whole session (predict and server
tests use it too).
"""
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch

from conftest import labeled_csv, tiny_llama
from tailorlm.serve.chat import ChatSession, run_chat
from tailorlm.serve.engine import Engine, PromptError, Sampling

SYSTEM = "You label movie reviews."
# eval.max_new_tokens keeps the run's (and predict's) generation short: this model never stops by itself.
RUN_ARGS = ["train.max_steps=2", "train.batch_size=4", "eval.baselines=[]", "template.max_length=96",
            "eval.max_new_tokens=6", f"template.system={SYSTEM}"]


def fast_run_args() -> list[str]:
    """RUN_ARGS, plus retention off (tests here need a finished run, not its report)."""
    return RUN_ARGS + ["eval.retention.data=null"]


def serve_run(tmp_path_factory, tokenizer):
    """A finished `tailor run` (LoRA, with a system prompt) on a lively tiny model; built once per session."""
    from tailorlm.cli import main

    root = tmp_path_factory.getbasetemp() / "serve-run"
    run = root / "run"
    if not (run / "run.json").is_file() or '"complete"' not in (run / "run.json").read_text():
        model_dir = root / "lively-tiny"
        model = tiny_llama(len(tokenizer))
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.mul_(10)  # initializer range 0.2 instead of 0.02: varied greedy answers
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        data = labeled_csv(root / "reviews.csv")
        args = ["run", f"model.path={model_dir}", f"data.train={data}", "--output", str(run), *fast_run_args()]
        assert main(args) == 0
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer):
    from tailorlm.models.trained import load_trained

    return load_trained(serve_run(tmp_path_factory, tiny_tokenizer), merge=True)


@pytest.fixture
def engine(trained):
    engine = Engine(trained.model, trained.tokenizer, trained.chat_format(), "cpu", max_batch=8)
    yield engine
    engine.close()


def direct_greedy(trained, prompt_ids: list[int], max_new_tokens: int) -> str:
    """transformers' own greedy generate, one prompt at a time: the reference every path must match."""
    with torch.no_grad():
        out = trained.model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=trained.tokenizer.pad_token_id, eos_token_id=2)
    return trained.tokenizer.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


@contextmanager
def slowed(model, seconds: float):
    """Every forward pass of the model takes `seconds` longer: generations long enough to interrupt."""
    handle = model.register_forward_pre_hook(lambda module, args: time.sleep(seconds))
    try:
        yield
    finally:
        handle.remove()


def wait_until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition did not come true in time"
        time.sleep(0.01)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_training_prompt_sent_as_a_user_message_gives_the_training_prompt_ids(trained, engine):
    from tailorlm.data.tokenize import encode_examples

    template, fmt = trained.template(), trained.chat_format()
    example = {"text": "a great movie with an award winning actor 3", "label": "positive", "_where": "x"}
    (sample,), _ = encode_examples([example], template, fmt, trained.labels, trained.cfg.template)
    prompt_text = template.prompt(sample.example, trained.labels)  # as trained: shortened to fit max_length
    assert engine.chat_prompt([{"role": "user", "content": prompt_text}]) == sample.prompt_ids
    assert trained.tokenizer.decode(sample.prompt_ids).startswith(f"<|im_start|>system\n{SYSTEM}")
    # A client's own system message replaces the run's.
    own = engine.chat_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt_text}])
    assert own == chat_ids(trained.tokenizer, [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": prompt_text}])


def test_streamed_text_equals_the_greedy_generation(trained, engine):
    prompt = chat_ids(trained.tokenizer, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}])
    expected = direct_greedy(trained, prompt, 12)
    assert len(set(expected)) > 3  # a real answer, not one repeated character
    stream = engine.stream(prompt, Sampling(12))
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == expected
    assert stream.completion.text == expected and stream.completion.completion_tokens == 12
    assert stream.completion.finish_reason == "length" and stream.completion.prompt_tokens == len(prompt)
    assert engine.complete(prompt, Sampling(12)).text == expected


def test_stop_strings_cut_the_answer_in_both_paths(trained, engine):
    prompt = engine.chat_prompt([{"role": "user", "content": "the film won an award"}])
    full = direct_greedy(trained, prompt, 16)
    stop = full[5:8]
    assert stop and full.index(stop) == 5
    done = engine.complete(prompt, Sampling(16, stop=(stop, "never seen")))
    assert (done.text, done.finish_reason) == (full[:5], "stop") and done.completion_tokens < 16
    stream = engine.stream(prompt, Sampling(16, stop=(stop,)))
    assert "".join(stream) == full[:5] and stream.completion.finish_reason == "stop"


def test_queued_greedy_requests_run_as_one_batch_with_their_own_answers(trained, engine):
    prompts = [engine.chat_prompt([{"role": "user", "content": text}])
               for text in ("hello", "the market rose", "the film won an award", "the team won the match")]
    budgets = [3, 9, 14, 6]
    expected = [direct_greedy(trained, p, n) for p, n in zip(prompts, budgets)]
    entered, gate, running, most = threading.Event(), threading.Event(), [0], [0]
    generate = engine.model.generate

    def gated_generate(*args, **kwargs):  # hold the first generation until the other requests are queued
        running[0] += 1
        most[0] = max(most[0], running[0])
        entered.set()
        gate.wait(10)
        try:
            return generate(*args, **kwargs)
        finally:
            running[0] -= 1

    engine.model.generate = gated_generate
    try:
        futures = [engine.submit(prompts[0], Sampling(budgets[0]))]
        assert entered.wait(10)
        futures += [engine.submit(p, Sampling(n)) for p, n in zip(prompts[1:], budgets[1:])]
        gate.set()
        results = [f.result(30) for f in futures]
    finally:
        del engine.model.generate
    assert [r.text for r in results] == expected
    assert [r.completion_tokens for r in results] == budgets
    assert engine.batch_sizes == [1, 3] and most[0] == 1  # never two generations on the model at once


def test_a_short_row_is_answered_before_the_long_row_of_its_batch_ends(trained, engine):
    prompts = [engine.chat_prompt([{"role": "user", "content": text}]) for text in ("hello", "the market rose")]
    expected = [direct_greedy(trained, prompts[0], 60), direct_greedy(trained, prompts[1], 4)]
    entered, gate, generate = threading.Event(), threading.Event(), engine.model.generate

    def gated_generate(*args, **kwargs):  # hold the first generation until both requests are queued
        entered.set()
        gate.wait(10)
        return generate(*args, **kwargs)

    engine.model.generate = gated_generate
    try:
        with slowed(engine.model, 0.01):
            engine.submit(prompts[0], Sampling(1))
            assert entered.wait(10)
            long, short = engine.submit(prompts[0], Sampling(60)), engine.submit(prompts[1], Sampling(4))
            gate.set()
            assert short.result(30).text == expected[1]
            assert not long.done()  # the short answer did not wait for the 56 steps the long row still needs
            assert long.result(30).text == expected[0]
    finally:
        del engine.model.generate
    assert engine.batch_sizes == [1, 2]


def _long_answer(engine, prompt: list[int], sampling: Sampling, streamed: bool) -> str:
    return "".join(engine.stream(prompt, sampling)) if streamed else engine.complete(prompt, sampling).text


@pytest.mark.parametrize("kind", ["greedy", "sampled", "streamed"])
def test_a_long_generation_pauses_for_a_new_request_and_resumes_unchanged(trained, kind):
    """Past a slice, a generation gives the model to a request that waits, then continues from its cache and
    its own random state: its answer is the one it gives uninterrupted."""
    engine = Engine(trained.model, trained.tokenizer, trained.chat_format(), "cpu", slice_tokens=8)
    prompt, other = (engine.chat_prompt([{"role": "user", "content": t}]) for t in ("the film won", "hello"))
    sampling = Sampling(60, temperature=1.0, seed=3) if kind == "sampled" else Sampling(60)
    interrupting = Sampling(5, temperature=1.0, seed=11)  # reseeds the generator the paused run samples from
    try:
        alone = _long_answer(engine, prompt, sampling, kind == "streamed")
        calls = len(engine.batch_sizes)
        with slowed(engine.model, 0.01), ThreadPoolExecutor(1) as pool:
            long = pool.submit(_long_answer, engine, prompt, sampling, kind == "streamed")
            wait_until(lambda: len(engine.batch_sizes) > calls)
            assert engine.complete(other, interrupting).completion_tokens > 0
            assert not long.done()  # the new request was answered while the long one waited
            assert long.result(60) == alone
        assert engine.batch_sizes[calls:] == [1, 1, 1]  # the long run's first turn, the new request, the rest
    finally:
        engine.close()


def test_a_paused_generation_still_progresses_while_new_requests_keep_coming(trained):
    """Two clients send short sampled requests back to back, so one always waits: the long generation, paused
    after its first slice, is still resumed every RESUME_EVERY-th turn and finishes meanwhile."""
    engine = Engine(trained.model, trained.tokenizer, trained.chat_format(), "cpu", slice_tokens=4)
    prompt = engine.chat_prompt([{"role": "user", "content": "the film won"}])
    stop, shorts = threading.Event(), []

    def keep_asking() -> None:  # sampled requests run one at a time, so they never merge into one batch
        while not stop.is_set() and len(shorts) < 400:
            shorts.append(engine.complete(prompt, Sampling(2, temperature=1.0)))

    try:
        long = engine.submit(prompt, Sampling(24))
        wait_until(lambda: len(engine.batch_sizes) > 0)
        with ThreadPoolExecutor(2) as pool:
            askers = [pool.submit(keep_asking) for _ in range(2)]
            long.result(60)
            finished_during = len(shorts) < 400 and not any(a.done() for a in askers)
            stop.set()
        assert finished_during  # not starved until the other clients stopped
        assert long.result().text == direct_greedy(trained, prompt, 24)
    finally:
        engine.close()


def test_sampling_is_reproducible_with_a_seed(engine):
    prompt = engine.chat_prompt([{"role": "user", "content": "hello"}])
    runs = [engine.complete(prompt, Sampling(10, temperature=1.0, seed=s)).text for s in (1, 1, 2, 3)]
    assert runs[0] == runs[1]
    assert len(set(runs)) > 1


def test_the_context_bounds_prompt_and_answer(engine):
    room = Sampling(50)
    assert engine.fit([5] * (engine.context_length - 10), room).max_new_tokens == 10
    with pytest.raises(PromptError, match=r"^the prompt is 512 tokens; this model's context is 512 tokens"):
        engine.fit([5] * 512, room)
    with pytest.raises(PromptError, match=r"the last message must come from the user \(role 'user'\); "
                                          r"it is 'assistant'"):
        engine.chat_prompt([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}])


def test_scripted_chat_keeps_history_and_obeys_commands(trained, engine):
    session = ChatSession(engine, Sampling(8), system=None)
    stdin = io.StringIO("hello\nthe film won\n/reset\n/system You are terse.\nhello\n/bogus\n/exit\nnot read\n")
    stdout = io.StringIO()
    assert run_chat(session, stdin, stdout) == 0

    tok = trained.tokenizer
    first = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hello"}]
    answer1 = direct_greedy(trained, chat_ids(tok, first), 8)
    second = first + [{"role": "assistant", "content": answer1}, {"role": "user", "content": "the film won"}]
    answer2 = direct_greedy(trained, chat_ids(tok, second), 8)
    after_reset = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"}]
    answer3 = direct_greedy(trained, chat_ids(tok, after_reset), 8)
    assert len({answer1, answer2, answer3}) == 3  # the history and the system prompt changed each answer

    out = stdout.getvalue()
    assert f"you> model> {answer1}\nyou> model> {answer2}\n" in out
    assert "you> (conversation cleared)\nyou> (system prompt: You are terse.)\n" in out
    assert f"you> model> {answer3}\nyou> (unknown command /bogus)" in out
    assert "not read" not in out and out.endswith("you> ")
    assert session.history == after_reset[1:] + [{"role": "assistant", "content": answer3}]


def test_chat_ends_at_end_of_input_and_reports_an_overlong_message(engine):
    session = ChatSession(engine, Sampling(4))
    stdout = io.StringIO()
    assert run_chat(session, io.StringIO("word " * 600 + "\n"), stdout) == 0
    assert "(cannot answer: the prompt is" in stdout.getvalue() and stdout.getvalue().endswith("you> \n")
    assert session.history == []


def test_without_a_chat_template_a_user_message_is_the_plain_training_layout(trained):
    from tailorlm.config import TemplateSpec
    from tailorlm.data.tokenize import ChatFormat

    fmt = ChatFormat(trained.tokenizer, TemplateSpec(chat_template="never", system=SYSTEM))
    engine = Engine(trained.model, trained.tokenizer, fmt, "cpu")
    try:
        user = [{"role": "user", "content": "the film"}]
        # The plain layout trains without the system text, so the run's system prompt is not added.
        assert engine.chat_prompt(user) == fmt.encode_prompt(fmt.prompt_text("the film"))
        conversation = [{"role": "system", "content": "Be brief."}, *user,
                        {"role": "assistant", "content": "positive"}, {"role": "user", "content": "bad"}]
        text = trained.tokenizer.decode(engine.chat_prompt(conversation))
        assert text == "Be brief.\n\nthe film\nAnswer: positive\n\nbad\nAnswer:"
        with pytest.raises(PromptError, match="messages must alternate user, assistant, ..., user"):
            engine.chat_prompt(user + user)
    finally:
        engine.close()


def test_the_oldest_exchanges_make_room_when_the_context_fills(engine):
    def exchange(i: int) -> list[dict]:
        return [{"role": "user", "content": f"the market rose {i} " * 4}, {"role": "assistant", "content": "ok"}]

    session = ChatSession(engine, Sampling(4))
    session.history = exchange(0) + exchange(1) + exchange(2)
    engine.context_length = len(engine.chat_prompt(session.messages("hello")))  # no room left to answer
    answer = "".join(session.reply("hello"))
    assert len(answer) > 0
    assert session.history == exchange(1) + exchange(2) + [{"role": "user", "content": "hello"},
                                                           {"role": "assistant", "content": answer}]


def test_the_chat_verb_talks_to_a_run_directory(trained, monkeypatch, capsys):
    from tailorlm.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    assert main(["chat", str(trained.run_dir), "--max-new-tokens", "5", "--temperature", "0"]) == 0
    expected = direct_greedy(trained, chat_ids(trained.tokenizer, [{"role": "system", "content": SYSTEM},
                                                                   {"role": "user", "content": "hello"}]), 5)
    assert f"you> model> {expected}\nyou> " in capsys.readouterr().out
