"""`tailor serve` end to end: a live uvicorn server on a free port, driven by the official openai client."""
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from openai import OpenAI

from test_serve_chat import SYSTEM, direct_greedy, serve_run, slowed, wait_until
from tailorlm.ops.engines import model_id
from tailorlm.serve.engine import Engine, Sampling
from tailorlm.serve.server import BackgroundServer, Limits, create_app


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer):
    from tailorlm.models.trained import load_trained

    path = serve_run(tmp_path_factory, tiny_tokenizer)
    trained = load_trained(path, merge=True)
    trained.served_as = model_id(str(path), trained)
    return trained


@pytest.fixture(scope="module")
def generations(trained):
    """Counts the engine's generate() calls running at once on the model (must never exceed one).

    Only calls from the engine's worker thread count. The tests' own reference generate() (direct_greedy, on the
    test thread) is not the engine's, and may overlap the worker's last call: a reply is handed over as soon as
    its row ends, before that generate() returns, and a cancelled stream ends at its next decode step."""
    state = {"running": 0, "most": 0, "calls": 0}
    lock, generate = threading.Lock(), trained.model.generate

    def counted(*args, **kwargs):
        if threading.current_thread().name != "tailor-model-worker":
            return generate(*args, **kwargs)
        with lock:
            state["running"] += 1
            state["calls"] += 1
            state["most"] = max(state["most"], state["running"])
        try:
            return generate(*args, **kwargs)
        finally:
            with lock:
                state["running"] -= 1

    trained.model.generate = counted
    yield state
    del trained.model.generate


@pytest.fixture(scope="module")
def engine(trained, generations):
    engine = Engine(trained.model, trained.tokenizer, trained.chat_format(), "cpu", max_batch=8)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(trained, engine):
    with BackgroundServer(create_app(engine, trained.served_as)) as server:
        yield OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def training_prompt(trained):
    from tailorlm.data.tokenize import encode_examples

    example = {"text": "an awful film the director failed 4", "label": "negative", "_where": "x"}
    (sample,), _ = encode_examples([example], trained.template(), trained.chat_format(), trained.labels,
                                   trained.cfg.template)
    return trained.template().prompt(sample.example, trained.labels), sample.prompt_ids


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_the_model_list_names_the_run(client, trained):
    assert trained.served_as == "run"
    assert [m.id for m in client.models.list().data] == ["run"]
    assert client.models.retrieve("run").owned_by == "tailorlm"


def test_a_training_prompt_gets_the_training_answer(client, trained, training_prompt):
    text, prompt_ids = training_prompt
    reply = client.chat.completions.create(model="run", messages=user(text), max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == direct_greedy(trained, prompt_ids, 12)
    assert (choice.finish_reason, reply.usage.completion_tokens) == ("length", 12)
    assert reply.usage.prompt_tokens == len(prompt_ids) and reply.usage.total_tokens == len(prompt_ids) + 12
    assert trained.tokenizer.decode(prompt_ids).startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>")


def test_streamed_chunks_add_up_to_the_reply(client):
    kwargs = dict(model="run", messages=user("the market rose"), max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) > 4 and len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_stop_strings_end_the_reply_before_them(client):
    kwargs = dict(model="run", messages=user("the team won the match"), max_tokens=16, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = whole[4:7]
    assert whole.index(stop) == 4
    cut = client.chat.completions.create(**kwargs, stop=[stop]).choices[0]
    assert (cut.message.content, cut.finish_reason) == (whole[:4], "stop")
    streamed = client.chat.completions.create(**kwargs, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole[:4]


def test_text_completions_continue_the_raw_prompt(client, trained):
    ids = trained.tokenizer("the film won")["input_ids"]
    expected = direct_greedy(trained, ids, 8)
    reply = client.completions.create(model="run", prompt="the film won", max_tokens=8, temperature=0)
    assert reply.choices[0].text == expected and reply.usage.prompt_tokens == len(ids)
    assert client.completions.create(model="run", prompt=ids, max_tokens=8, temperature=0).choices[0].text == expected
    stream = client.completions.create(model="run", prompt="the film won", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected


def test_a_seed_makes_sampling_repeatable(client):
    kwargs = dict(model="run", messages=user("hello"), max_tokens=10, temperature=1.0, top_p=0.9)
    a, b = (client.chat.completions.create(**kwargs, seed=7).choices[0].message.content for _ in range(2))
    assert a == b


BAD_CHAT = [
    ({"model": "run"}, "missing required parameter 'messages'", "messages"),
    ({"model": "run", "messages": [{"role": "robot", "content": "hi"}]},
     "messages[0].role: Input should be 'system', 'developer', 'user' or 'assistant'", "messages[0].role"),
    ({"model": "run", "messages": "hi"}, "messages: Input should be a valid list", "messages"),
    ({"model": "run", "messages": user("hi"), "temperature": "hot"},
     "temperature: Input should be a valid number", "temperature"),
    ({"model": "run", "messages": user("hi"), "max_tokens": 0},
     "max_tokens: Input should be greater than 0", "max_tokens"),
    ({"model": "run", "messages": user("hi"), "n": 2}, "n: only n=1 is supported (one choice per request)", "n"),
    ({"model": "run", "messages": []},
     "messages: List should have at least 1 item after validation, not 0", "messages"),
    ({"model": "run", "messages": user("hi") + [{"role": "assistant", "content": "yes"}]},
     "the last message must come from the user (role 'user'); it is 'assistant'", "messages"),
]


@pytest.mark.parametrize("body,message,param", BAD_CHAT, ids=[b[2] + str(i) for i, b in enumerate(BAD_CHAT)])
def test_bad_chat_requests_get_a_400_naming_the_problem(client, body, message, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/chat/completions", body=body, cast_to=object)
    error = caught.value
    assert error.status_code == 400 and error.body["message"] == message
    assert (error.type, error.param) == ("invalid_request_error", param)


def test_other_bad_requests(client, engine):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=user("hi"))
    assert caught.value.body["message"] == "The model 'gpt-4o' does not exist; this server serves 'run'"
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="run", prompt=[5] * engine.context_length)
    assert caught.value.body["message"] == ("the prompt is 512 tokens; this model's context is 512 tokens, "
                                            "prompt and completion together")
    assert (caught.value.code, caught.value.param) == ("context_length_exceeded", "prompt")
    with pytest.raises(openai.BadRequestError, match=r"^Error code: 400 - the prompt is empty$"):
        client.completions.create(model="run", prompt="")
    with pytest.raises(openai.BadRequestError, match=r"token ids outside the vocabulary \(0 to 399\)"):
        client.completions.create(model="run", prompt=[5, 400])
    with pytest.raises(openai.BadRequestError, match="a list of prompts is not supported; send one prompt per request"):
        client.completions.create(model="run", prompt=["a", "b"])
    with pytest.raises(openai.BadRequestError, match="stream: Input should be a valid boolean"):
        client.post("/completions", body={"model": "run", "prompt": "a", "stream": "yes"}, cast_to=object)


def test_a_body_that_is_not_json_gets_a_json_error(client):
    request = urllib.request.Request(f"{client.base_url}chat/completions", data=b"{not json",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 400
    assert json.loads(caught.value.read())["error"]["message"].startswith("the request body is not valid JSON")


def test_concurrent_clients_get_the_sequential_answers(client, engine, generations):
    """8 clients x 3 requests (chat, streamed chat, text) at once: no errors, every answer as when run alone."""
    texts = ["hello", "the market rose", "the film won an award", "the team won the match", "the new phone",
             "the minister said", "a great movie", "an awful film"]

    def ask(i: int, kind: str) -> str:
        args = dict(model="run", max_tokens=4 + i, temperature=0)
        if kind == "text":
            return client.completions.create(prompt=texts[i], **args).choices[0].text
        if kind == "stream":
            chunks = client.chat.completions.create(messages=user(texts[i]), stream=True, **args)
            return "".join(c.choices[0].delta.content or "" for c in chunks)
        return client.chat.completions.create(messages=user(texts[i]), **args).choices[0].message.content

    jobs = [(i, kind) for i in range(8) for kind in ("chat", "stream", "text")]
    alone = {job: ask(*job) for job in jobs}
    assert len(set(alone.values())) > 12  # the answers differ: equality below is not vacuous
    first_batch = len(engine.batch_sizes)

    def one_client(i: int) -> list[str]:
        return [ask(i, kind) for kind in ("chat", "stream", "text")]

    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(one_client, range(8)))
    assert {(i, kind): together[i][k] for i in range(8) for k, kind in enumerate(("chat", "stream", "text"))} == alone
    assert generations["most"] == 1  # one generation on the model at a time
    assert max(engine.batch_sizes[first_batch:]) > 1  # queued greedy requests were batched


def test_the_raw_stream_is_server_sent_events_ending_with_done(client):
    body = json.dumps({"model": "run", "prompt": "hello", "max_tokens": 3, "temperature": 0, "stream": True}).encode()
    request = urllib.request.Request(f"{client.base_url}completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_failed_generation_is_a_500_and_the_worker_lives_on(client, trained, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(trained.model, "generate", broken)
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="run", messages=user("hi"), max_tokens=3)
    assert caught.value.body["message"] == "RuntimeError: out of memory (simulated)"
    with pytest.raises(openai.APIError, match=r"out of memory \(simulated\)"):
        list(client.chat.completions.create(model="run", messages=user("hi"), max_tokens=3, stream=True))
    monkeypatch.undo()
    reply = client.chat.completions.create(model="run", messages=user("hi"), max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3


def test_the_serve_verb_serves_a_run_under_its_name(trained, monkeypatch):
    from tailorlm.cli import main

    seen = {}

    def fake_serve(engine, name, host, port, limits):  # everything but uvicorn.run, which the tests above cover
        seen.update(name=name, host=host, port=port, max_batch=engine.max_batch, system=engine.fmt.system,
                    limits=limits)
        engine.close()

    monkeypatch.setattr("tailorlm.serve.server.serve", fake_serve)
    assert main(["serve", str(trained.run_dir), "--port", "8123", "--max-batch", "3"]) == 0
    assert seen == {"name": "run", "host": "127.0.0.1", "port": 8123, "max_batch": 3, "system": SYSTEM,
                    "limits": Limits(max_tokens=2048, queue_timeout=60.0)}
    assert main(["serve", str(trained.run_dir), "--max-tokens-limit", "300", "--queue-timeout", "2.5"]) == 0
    assert seen["limits"] == Limits(max_tokens=300, queue_timeout=2.5)


# ---- clients that misbehave -------------------------------------------------------------------------------------

STEP_S = 0.03  # added to each forward pass: 400 tokens take about 12 s, and a 32-token slice about 1 s


@pytest.fixture
def slow_steps(trained):
    with slowed(trained.model, STEP_S):
        yield


def long_chat(**extra) -> dict:
    """A greedy chat request for 400 tokens (this model never ends an answer by itself)."""
    return {"model": "run", "messages": user("the film won an award"), "max_tokens": 400, "temperature": 0, **extra}


def send_and_keep(address: tuple[str, int], path: str, body: dict) -> socket.socket:
    """POST body and return the open connection without reading the reply: closing it walks away."""
    data = json.dumps(body).encode()
    connection = socket.create_connection(address, timeout=30)
    connection.sendall(f"POST /v1/{path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return connection


def address(client: OpenAI) -> tuple[str, int]:
    return client.base_url.host, client.base_url.port


def test_a_client_that_leaves_stops_its_generation_and_frees_the_model(client, engine, generations, slow_steps):
    cancels, calls = len(engine.cancelled), generations["calls"]
    leaver = send_and_keep(address(client), "chat/completions", long_chat())
    wait_until(lambda: generations["calls"] > calls)
    time.sleep(0.3)  # about 10 of its 400 tokens
    leaver.close()
    wait_until(lambda: len(engine.cancelled) > cancels)
    assert 0 < engine.cancelled[-1] < 100  # stopped soon after its client left, not after 400 tokens
    started = time.monotonic()
    reply = client.chat.completions.create(model="run", messages=user("hi"), max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens == 3 and time.monotonic() - started < 5


def test_a_streaming_client_that_leaves_stops_its_generation(client, engine, slow_steps):
    cancels = len(engine.cancelled)
    leaver = send_and_keep(address(client), "chat/completions", long_chat(stream=True))
    received = b""
    while received.count(b"data: ") < 3:  # the opening chunk and two pieces of text
        received += leaver.recv(4096)
    leaver.close()
    wait_until(lambda: len(engine.cancelled) > cancels)
    assert 0 < engine.cancelled[-1] < 100


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_queued_client_that_leaves_never_reaches_the_model(client, engine, generations, slow_steps, stream):
    cancels = len(engine.cancelled)
    holder = send_and_keep(address(client), "chat/completions", long_chat())  # the model is busy for a slice
    wait_until(lambda: generations["running"] == 1)
    queued = send_and_keep(address(client), "chat/completions", long_chat(messages=user("hello"), stream=stream))
    wait_until(lambda: engine.queued == 1)
    queued.close()
    wait_until(lambda: len(engine.cancelled) > cancels)
    assert engine.cancelled[-1] == 0  # taken out of the queue: not one token generated
    holder.close()
    wait_until(lambda: len(engine.cancelled) > cancels + 1)
    assert engine.cancelled[-1] < 100


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_request_the_model_cannot_take_in_time_gets_a_503_with_retry_after(engine, generations, slow_steps,
                                                                              stream):
    with BackgroundServer(create_app(engine, "run", Limits(queue_timeout=0.2))) as server:
        impatient = OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)
        cancels, calls = len(engine.cancelled), generations["calls"]
        holder = send_and_keep((server.host, server.port), "chat/completions", long_chat())
        wait_until(lambda: generations["running"] == 1)
        with pytest.raises(openai.InternalServerError) as caught:
            impatient.chat.completions.create(model="run", messages=user("hi"), max_tokens=3, stream=stream)
        holder.close()
        wait_until(lambda: len(engine.cancelled) > cancels)
    assert generations["calls"] == calls + 1  # only the holder's: the refused request never reached the model
    error = caught.value
    assert error.status_code == 503 and error.response.headers["Retry-After"] == "1"
    assert error.body == {"message": "the server is busy: the request waited 0.2 s without reaching the model; "
                                     "retry in 1 s", "type": "server_error", "param": None, "code": "queue_timeout"}


def test_max_tokens_over_the_server_limit_is_a_400_naming_the_limit(engine):
    with BackgroundServer(create_app(engine, "run", Limits(max_tokens=40))) as server:
        capped = OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60)
        asks = [("max_tokens", lambda: capped.chat.completions.create(model="run", messages=user("hi"), max_tokens=41)),
                ("max_completion_tokens", lambda: capped.chat.completions.create(
                    model="run", messages=user("hi"), max_completion_tokens=41)),
                ("max_tokens", lambda: capped.completions.create(model="run", prompt="hi", max_tokens=41, stream=True))]
        for param, ask in asks:
            with pytest.raises(openai.BadRequestError) as caught:
                ask()
            assert caught.value.body["message"] == f"{param} is 41; this server allows at most 40 tokens per completion"
            assert caught.value.param == param
        at_limit = capped.chat.completions.create(model="run", messages=user("hi"), max_tokens=40, temperature=0)
        unasked = capped.chat.completions.create(model="run", messages=user("hi"), temperature=0)  # default 256
    assert at_limit.usage.completion_tokens == 40 and unasked.usage.completion_tokens == 40


def post_raw(client: OpenAI, path: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{client.base_url}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]


OUT_OF_RANGE = [
    ("seed", 2**64, "seed: Input should be less than or equal to 9223372036854775807"),
    ("seed", -2**63 - 1, "seed: Input should be greater than or equal to -9223372036854775808"),
    ("seed", 1.5, "seed: Input should be a valid integer"),
    ("max_tokens", 2**70, f"max_tokens is {2**70}; this server allows at most 2048 tokens per completion"),
    ("max_tokens", -1, "max_tokens: Input should be greater than 0"),
    ("max_tokens", True, "max_tokens: Input should be a valid integer"),
    ("max_completion_tokens", 10**6, "max_completion_tokens is 1000000; this server allows at most 2048 tokens "
                                     "per completion"),
    ("max_completion_tokens", 0, "max_completion_tokens: Input should be greater than 0"),
    ("temperature", float("nan"), "temperature: Input should be a finite number"),
    ("temperature", float("inf"), "temperature: Input should be a finite number"),
    ("temperature", 2.5, "temperature: Input should be less than or equal to 2"),
    ("temperature", -0.1, "temperature: Input should be greater than or equal to 0"),
    ("top_p", float("nan"), "top_p: Input should be a finite number"),
    ("top_p", 0, "top_p: Input should be greater than 0"),
    ("top_p", 1.01, "top_p: Input should be less than or equal to 1"),
    ("n", 2**64, "n: only n=1 is supported (one choice per request)"),
    ("n", "1", "n: Input should be a valid integer"),
    ("stop", ["a", "b", "c", "d", "e"], "stop: at most 4 stop strings, none of them empty"),
    ("stop", [7], "stop[0]: Input should be a valid string"),
    ("stream", 1, "stream: Input should be a valid boolean"),
    ("stream_options", {"include_usage": "yes"}, "stream_options.include_usage: Input should be a valid boolean"),
]


@pytest.mark.parametrize("param,value,message", OUT_OF_RANGE,
                         ids=[f"{p}={str(v)[:12]}" for p, v, _ in OUT_OF_RANGE])
def test_every_out_of_range_parameter_is_a_400_naming_it(client, param, value, message):
    body = {"model": "run", "messages": user("hi"), "max_tokens": 2, param: value}  # sampled: the seed is used
    status, error = post_raw(client, "chat/completions", json.dumps(body).encode())
    named = message.split(" ")[0].rstrip(":")  # the parameter, or the element of it, that is wrong
    assert named.startswith(param)
    assert (status, error["message"], error["param"], error["type"]) == (400, message, named, "invalid_request_error")


def test_out_of_range_token_ids_and_numbers_too_long_to_read_are_400s(client):
    status, error = post_raw(client, "completions", json.dumps({"model": "run", "prompt": [5, 2**64]}).encode())
    assert (status, error["message"]) == (400, "the prompt holds token ids outside the vocabulary (0 to 399)")
    status, error = post_raw(client, "completions", json.dumps({"model": "run", "prompt": [-1]}).encode())
    assert (status, error["message"]) == (400, "the prompt holds token ids outside the vocabulary (0 to 399)")
    digits = b'{"model": "run", "prompt": "hi", "seed": 1' + b"0" * 5000 + b"}"
    status, error = post_raw(client, "completions", digits)
    assert (status, error["message"]) == (400, "There was an error parsing the body")


# ---- a stall that outlived its cause -------------------------------------------------------------------------------

def test_a_paused_run_whose_client_left_does_not_stop_the_worker(trained):
    """A sampled run pauses for a short request; its client leaves while it waits. Once the short request ends,
    the worker finds only that cancelled run: it must end the run and wait for more work, not stop for good."""
    engine = Engine(trained.model, trained.tokenizer, trained.chat_format(), "cpu", slice_tokens=4)
    prompt = engine.chat_prompt(user("the film won"))
    try:
        with engine._wake:  # both queued before the worker takes either: the long run pauses after one slice
            leaver = engine.add(prompt, Sampling(200, temperature=1.0, seed=1))
            short = engine.add(prompt, Sampling(3, temperature=1.0, seed=2))
            # Called by the worker as it takes the short request, when the long run has just paused for it.
            short.started.add_done_callback(lambda _: engine.cancel(leaver))
        assert short.future.result(10).completion_tokens == 3
        assert leaver.future.result(10).completion_tokens == 4  # one slice, then its client was gone
        assert engine.cancelled == [4]
        later = engine.submit(prompt, Sampling(2, temperature=1.0))
        assert later.result(5).completion_tokens == 2
        assert engine._worker.is_alive()
    finally:
        engine.close()


def test_a_fault_outside_a_generation_fails_its_request_and_the_worker_goes_on(trained, caplog):
    """Building a run happens outside generate(); a fault there once killed the worker without a word."""
    caplog.set_level(logging.INFO, logger="tailorlm.serve")
    engine = Engine(trained.model, trained.tokenizer, trained.chat_format(), "cpu")
    build, prompt = engine._new_run, engine.chat_prompt(user("hello"))

    def fails_once(jobs):
        engine._new_run = build
        raise RuntimeError("no memory for the run (simulated)")

    engine._new_run = fails_once
    try:
        with pytest.raises(RuntimeError, match=r"^no memory for the run \(simulated\)$"):
            engine.submit(prompt, Sampling(3)).result(5)
        assert engine.submit(prompt, Sampling(2)).result(5).completion_tokens == 2
    finally:
        engine.close()
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "tailorlm.serve"] == [
        ("ERROR", "starting a run of 1 request(s) failed")]


def test_sampled_clients_killed_mid_answer_leave_the_server_answering(trained, caplog):
    """Three sampled long answers take turns a slice at a time; their clients are killed while one generates and
    two wait paused. The model is held still (a forward pass waits on a gate) until all three cancels have
    arrived, so the worker next finds a run that ended and two cancelled paused ones, every time."""
    caplog.set_level(logging.INFO, logger="tailorlm.serve")
    engine = Engine(trained.model, trained.tokenizer, trained.chat_format(), "cpu", slice_tokens=4)
    jobs, add = [], engine.add
    engine.add = lambda *args, **kwargs: jobs.append(add(*args, **kwargs)) or jobs[-1]
    flowing = threading.Event()
    flowing.set()

    def hold_while_stopped(module, args) -> None:
        flowing.wait(30)

    gate = trained.model.register_forward_pre_hook(hold_while_stopped)
    try:
        app = create_app(engine, "run", Limits(queue_timeout=5))
        with slowed(trained.model, 0.01), BackgroundServer(app) as server:
            # Seed 7 draws answers that run past 300 tokens for these prompts: no end token ends one early.
            leavers = [send_and_keep((server.host, server.port), "chat/completions",
                                     long_chat(messages=user(text), temperature=1.0, seed=7, max_tokens=300))
                       for text in ("the film won", "the market rose", "hello")]
            wait_until(lambda: len(engine.batch_sizes) >= 6)  # each has generated, paused and resumed
            flowing.clear()
            wait_until(lambda: len(engine._paused) == 2)  # held still: one run in a forward pass, two paused
            for connection in leavers:
                connection.close()
            wait_until(lambda: all(job.cancelled.is_set() for job in jobs))
            flowing.set()
            wait_until(lambda: len(engine.cancelled) == 3)
            started = time.monotonic()
            after = OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=30)
            reply = after.chat.completions.create(model="run", messages=user("hi"), max_tokens=3, temperature=0)
            assert reply.usage.completion_tokens == 3 and time.monotonic() - started < 3
    finally:
        flowing.set()
        gate.remove()
        engine.close()
    assert all(0 < n < 300 for n in engine.cancelled)
    assert [r.getMessage() for r in caplog.records if r.name == "tailorlm.serve"] == [
        "client left: /v1/chat/completions request cancelled while the model generated its answer"] * 3


# ---- every parameter honoured or refused --------------------------------------------------------------------------

REFUSED = [("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "it does not call tools or functions"),
           ("tool_choice", "auto", "it does not call tools or functions"),
           ("functions", [{"name": "f"}], "it does not call tools or functions"),
           ("function_call", {"name": "f"}, "it does not call tools or functions"),
           ("logit_bias", {"5": 10}, "it does not bias token logits"),
           ("presence_penalty", 0.5, "it applies no repetition penalty; only 0 (the default) is accepted"),
           ("frequency_penalty", -1, "it applies no repetition penalty; only 0 (the default) is accepted"),
           ("frequency_penalty", False, "it applies no repetition penalty; only 0 (the default) is accepted"),
           ("echo", True, "an answer never repeats its prompt"),
           ("suffix", " the end", "it does not insert text before a suffix"),
           ("best_of", 3, "it generates one candidate per request")]


@pytest.mark.parametrize("path", ["chat/completions", "completions"])
@pytest.mark.parametrize("param,value,why", REFUSED, ids=[f"{p}={v}"[:24] for p, v, _ in REFUSED])
def test_a_parameter_this_server_cannot_honour_is_a_400_naming_it(client, path, param, value, why):
    body = {"model": "run", "max_tokens": 2, param: value,
            **({"messages": user("hi")} if path.startswith("chat") else {"prompt": "hi"})}
    status, error = post_raw(client, path, json.dumps(body).encode())
    assert (status, error["message"], error["param"], error["type"]) == (
        400, f"{param} is not supported by this server: {why}", param, "invalid_request_error")


def test_values_that_change_nothing_and_harmless_parameters_are_accepted(client):
    neutral = {"presence_penalty": 0, "frequency_penalty": 0.0, "tools": [], "tool_choice": "none",
               "logit_bias": {}, "user": "u-1", "metadata": {"team": "a"}, "store": False,
               "parallel_tool_calls": True, "service_tier": "auto", "response_format": {"type": "text"}}
    plain = client.chat.completions.create(model="run", messages=user("hello"), max_tokens=5, temperature=0)
    status, reply = post_raw(client, "chat/completions", json.dumps(
        {"model": "run", "messages": user("hello"), "max_tokens": 5, "temperature": 0, **neutral}).encode())
    assert status == 200 and reply["choices"][0]["message"]["content"] == plain.choices[0].message.content
    assert reply["choices"][0]["logprobs"] is None


def forward_logprobs(trained, prompt_ids: list[int], answer_ids: list[int]) -> torch.Tensor:
    """One forward pass over prompt and answer: row i is the model's log-softmax for the answer's token i."""
    with torch.no_grad():
        logits = trained.model(torch.tensor([prompt_ids + answer_ids])).logits[0]
    return torch.log_softmax(logits[len(prompt_ids) - 1:-1].float(), dim=-1)


def test_chat_logprobs_are_the_models_log_softmax(client, engine, trained):
    prompt = engine.chat_prompt(user("hello"))
    with torch.no_grad():
        out = trained.model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, pad_token_id=3)
    answer = out[0, len(prompt):].tolist()
    rows = forward_logprobs(trained, prompt, answer)
    reply = client.chat.completions.create(model="run", messages=user("hello"), max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=3)
    choice = reply.choices[0]
    content = choice.logprobs.content
    assert choice.message.content == "Ionononon{ f-" == "".join(t.token for t in content)
    assert [t.token for t in content] == [trained.tokenizer.decode([i]) for i in answer]
    for entry, token, row in zip(content, answer, rows, strict=True):
        assert bytes(entry.bytes) == entry.token.encode() and len(entry.top_logprobs) == 3
        assert entry.logprob == entry.top_logprobs[0].logprob == max(t.logprob for t in entry.top_logprobs)
        assert entry.token == entry.top_logprobs[0].token
        assert abs(entry.logprob - row[token].item()) < 1e-4
        values, ids = row.topk(3)
        assert [t.token for t in entry.top_logprobs] == [trained.tokenizer.decode([i]) for i in ids.tolist()]
        assert all(abs(t.logprob - v) < 1e-4 for t, v in zip(entry.top_logprobs, values.tolist()))
    bare = client.chat.completions.create(model="run", messages=user("hello"), max_tokens=8, temperature=0,
                                          logprobs=True)
    assert [t.top_logprobs for t in bare.choices[0].logprobs.content] == [[]] * 8
    assert [t.logprob for t in bare.choices[0].logprobs.content] == [t.logprob for t in content]


def test_sampled_logprobs_are_of_the_raw_logits_not_the_tempered_ones(client, engine, trained):
    from tailorlm.serve.logprobs import TokenTable

    table = TokenTable(trained.tokenizer, engine.vocab_size)
    id_of = {raw: token for token, raw in enumerate(table.bytes) if token not in table.special}
    prompt = engine.chat_prompt(user("the film won"))
    reply = client.chat.completions.create(model="run", messages=user("the film won"), max_tokens=10,
                                           temperature=0.5, seed=4, logprobs=True, top_logprobs=2)
    content = reply.choices[0].logprobs.content
    answer = [id_of[bytes(t.bytes)] for t in content]
    assert len(answer) == 10 and reply.usage.completion_tokens == 10
    for entry, token, row in zip(content, answer, forward_logprobs(trained, prompt, answer), strict=True):
        assert abs(entry.logprob - row[token].item()) < 1e-4
        top = row.topk(2).values.tolist()
        assert len(entry.top_logprobs) == 2 and all(abs(t.logprob - v) < 1e-4 for t, v in zip(entry.top_logprobs, top))


def test_legacy_completion_logprobs(client, engine, trained):
    prompt = trained.tokenizer("hello")["input_ids"]
    reply = client.completions.create(model="run", prompt="hello", max_tokens=6, temperature=0, logprobs=2)
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text and len(logprobs.tokens) == 6
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]
    answer = trained.tokenizer(choice.text)["input_ids"]
    rows = forward_logprobs(trained, prompt, answer)
    for token, logprob, top, token_id, row in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs,
                                                  answer, rows, strict=True):
        assert len(top) == 2 and top[token] == logprob == max(top.values())  # greedy: the chosen is the first
        assert abs(logprob - row[token_id].item()) < 1e-4
    plain = client.completions.create(model="run", prompt="hello", max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


LOGPROB_ERRORS = [
    ("chat/completions", {"logprobs": True, "stream": True}, "logprobs is not supported with stream: true on this "
     "server; ask for the whole answer (stream: false) to get log-probabilities", "logprobs"),
    ("completions", {"logprobs": 1, "stream": True}, "logprobs is not supported with stream: true on this "
     "server; ask for the whole answer (stream: false) to get log-probabilities", "logprobs"),
    ("chat/completions", {"top_logprobs": 2}, "top_logprobs needs logprobs: true", "top_logprobs"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 21},
     "top_logprobs: Input should be less than or equal to 20", "top_logprobs"),
    ("chat/completions", {"logprobs": 1}, "logprobs: Input should be a valid boolean", "logprobs"),
    ("completions", {"logprobs": 6}, "logprobs: Input should be less than or equal to 5", "logprobs"),
    ("completions", {"logprobs": True}, "logprobs: Input should be a valid integer", "logprobs"),
]


@pytest.mark.parametrize("path,extra,message,param", LOGPROB_ERRORS, ids=[str(e[1]) for e in LOGPROB_ERRORS])
def test_logprobs_asked_in_a_way_this_server_cannot_answer_is_a_400(client, path, extra, message, param):
    body = {"model": "run", **({"messages": user("hi")} if path.startswith("chat") else {"prompt": "hi"}), **extra}
    status, error = post_raw(client, path, json.dumps(body).encode())
    assert (status, error["message"], error["param"]) == (400, message, param)


# Bounded values only (enums, capped arrays, numbers of at most 16 digits a part): this random model's answers
# always close within max_tokens, so each can be checked as a whole document.
REVIEW_SCHEMA = {"type": "object", "required": ["label", "score", "count"], "additionalProperties": False,
                 "properties": {"label": {"enum": ["positive", "negative"]}, "score": {"type": "number"},
                                "count": {"type": "integer"}, "ok": {"type": ["boolean", "null"]},
                                "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}}


def matches_review_schema(document) -> bool:
    return (isinstance(document, dict) and {"label", "score", "count"} <= set(document)
            and set(document) <= set(REVIEW_SCHEMA["properties"])
            and document["label"] in ("positive", "negative") and type(document["score"]) in (int, float)
            and type(document["count"]) is int and document.get("ok") in (True, False, None)
            and all(type(f) is bool for f in document.get("flags", [])) and len(document.get("flags", [])) <= 3)


def test_json_schema_answers_are_documents_matching_the_schema(client):
    schema_format = {"type": "json_schema", "json_schema": {"name": "review", "schema": REVIEW_SCHEMA, "strict": True}}
    free = client.chat.completions.create(model="run", messages=user("the film won"), max_tokens=120, temperature=0)
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.choices[0].message.content)  # unconstrained, this model writes no JSON
    answers = []
    for temperature, seed in ((0, None), (1.0, 1), (1.0, 2), (1.0, 3)):
        reply = client.chat.completions.create(model="run", messages=user("the film won"), max_tokens=120,
                                               temperature=temperature, seed=seed, response_format=schema_format)
        text = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "stop" and matches_review_schema(json.loads(text)), text
        answers.append(text)
    assert len(set(answers)) == 4
    streamed = client.chat.completions.create(model="run", messages=user("the film won"), max_tokens=120,
                                              temperature=0, response_format=schema_format, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == answers[0]
    text = client.completions.create(model="run", prompt="the film won", max_tokens=120, temperature=0,
                                     extra_body={"response_format": schema_format}).choices[0].text
    assert matches_review_schema(json.loads(text))


def test_json_object_answers_parse_as_objects(client):
    for seed in (1, 2, 3):
        reply = client.chat.completions.create(model="run", messages=user("the film won"), max_tokens=60,
                                               temperature=1.0, seed=seed, response_format={"type": "json_object"})
        assert reply.choices[0].finish_reason == "stop" and json.loads(reply.choices[0].message.content) == {}
    greedy = client.chat.completions.create(model="run", messages=user("the film won"), max_tokens=60, temperature=0,
                                            response_format={"type": "json_object"})
    assert json.loads(greedy.choices[0].message.content) == {}


RESPONSE_FORMAT_ERRORS = [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "name": {"type": "string", "pattern": "^[A-Z]"}}}}},
     "response_format: the schema keyword 'pattern' at schema.properties.name is not supported; this server "
     "enforces type, properties, required, additionalProperties, items, minItems, maxItems, enum, const (and "
     "accepts title, description, default, examples, $schema, $comment as annotations)", "response_format"),
    ({"type": "json_schema"}, "response_format: type 'json_schema' needs a json_schema object "
                              "({'name': ..., 'schema': {...}})", "response_format"),
    ({"type": "yaml"}, "response_format.type: Input should be 'text', 'json_object' or 'json_schema'",
     "response_format.type"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "missing required parameter "
                                                             "'response_format.json_schema.name'",
     "response_format.json_schema.name"),
]


@pytest.mark.parametrize("response_format,message,param", RESPONSE_FORMAT_ERRORS,
                         ids=[m[:40] for _, m, _ in RESPONSE_FORMAT_ERRORS])
def test_a_response_format_this_server_cannot_enforce_is_a_400(client, response_format, message, param):
    body = {"model": "run", "messages": user("hi"), "response_format": response_format}
    status, error = post_raw(client, "chat/completions", json.dumps(body).encode())
    assert (status, error["message"], error["param"]) == (400, message, param)
