"""`tailor serve` end to end: a live uvicorn server on a free port, driven by the official openai client."""
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from openai import OpenAI

from test_serve_chat import SYSTEM, direct_greedy, serve_run, slowed, wait_until
from tailorlm.serve.command import model_id
from tailorlm.serve.engine import Engine
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
