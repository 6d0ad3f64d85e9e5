"""`anyshape serve`: the `openai` client against a server on 127.0.0.1 that holds one copy of a
tiny family's weights. Greedy answers equal `anyshape chat`'s at each size; concurrent requests
are decoded together and answer as sequential ones do; every bad request gets its 4xx while the
server goes on; a full queue answers 429, a busy size degrades, shutdown finishes what is in
flight and refuses what is new."""

import json
import os
import shutil
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from email.message import Message
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, LlamaConfig

import anyshape
from anyshape import Shape
from anyshape.compress.elastic import ELASTIC
from anyshape.router.control import RouterControl, load_router
from anyshape.runtime.chat import stop_tokens
from anyshape.runtime.generate import Sampling, generate
from anyshape.search.budget import Budget
from anyshape.serve.engine import Engine, QueueFull, Request
from anyshape.train.loop import train
from anyshape.train.settings import TrainSettings
from tests.conftest import byte_tokenizer
from tests.unit.test_chat import TEMPLATE
from tests.unit.test_cli import run

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
from anyshape.serve.server import build_server  # noqa: E402  (needs the serve extra)

HALF = {
    "layers": [0, 1, 3],
    "hidden_size": 48,
    "num_key_value_heads": 1,
    "num_attention_heads": 4,
    "intermediate_size": 64,
}
PROMPTS = ["Hello", "The cat sat on", "x", "Once upon a time, there", "1 2 3", "abc", "Deep", "zz top"]


@pytest.fixture(scope="module")
def family(tiny_dir, tmp_path_factory) -> Path:
    """A compress family's elastic/ model (the tiny Llama 3, with a chat template, without an
    end-of-sequence token) and a summary.json with one member, at 0.5."""
    root = tmp_path_factory.mktemp("family")
    folder = root / ELASTIC
    shutil.copytree(tiny_dir("llama3-gqa"), folder)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    record = {"train_tokens": 0, "fractions": [0.5, 0.75, 1.0], "align": 16, "budget_basis": "total",
              "band": 0.5, "algorithm": "random", "trials": 3}  # fmt: skip
    (folder / "anyshape.json").write_text(json.dumps({ELASTIC: record}))
    config_file = folder / "config.json"  # no end-of-sequence token: every answer runs to max_tokens
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "eos_token_id": None}))
    config = anyshape.load_config(folder)
    member = {"budget": 0.5, "shape": Shape.from_dict(HALF, config).to_dict(), "folder": "0.5"}
    (root / "summary.json").write_text(json.dumps({"members": [member]}))
    return folder


@contextmanager
def serving(folder: Path, **options):
    """A server of `folder` on a free port of 127.0.0.1, run on a thread until the block ends."""
    server = build_server(str(folder), port=0, **options)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(60)


@pytest.fixture(scope="module")
def server(family):
    with serving(family, max_batch=8) as running:
        yield running


def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server.address}/v1", api_key="unused", max_retries=0)


def post(server, path: str, body: bytes | dict) -> tuple[int, dict, Message]:
    """(status, JSON body, headers) of a POST, errors included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{server.address}{path}", data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


def expected_completion(folder: Path, prompt: str, shape: Shape | None, max_tokens: int) -> str:
    model, tokenizer = anyshape.load(folder), anyshape.load_tokenizer(folder)
    ids = tokenizer(prompt)["input_ids"]
    tokens = generate(model, ids, shape, max_tokens, stop_tokens=stop_tokens(tokenizer, model))
    return tokenizer.decode(list(tokens), skip_special_tokens=True)


def test_models_lists_the_whole_model_and_the_members(server):
    names = [model.id for model in client(server).models.list().data]
    assert names == ["anyshape", "anyshape@1", "anyshape@0.5"]


@pytest.mark.parametrize("name", ["anyshape@1", "anyshape@0.5"])
def test_greedy_completions_and_streamed_chat_equal_anyshape_chat(server, family, capsys, name):
    config = anyshape.load_config(family)
    shape = Shape.from_dict(HALF, config) if name.endswith("0.5") else Shape.full(config)
    api = client(server)
    completion = api.completions.create(model=name, prompt="The cat sat on", max_tokens=12, temperature=0)
    assert completion.model == name
    assert completion.choices[0].text == expected_completion(family, "The cat sat on", shape, 12)
    assert completion.usage.completion_tokens == 12 or completion.choices[0].finish_reason == "stop"

    stream = api.chat.completions.create(
        model=name, messages=[{"role": "user", "content": "Hi there"}], max_tokens=9, temperature=0, stream=True
    )
    chunks = list(stream)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    shape_file = Path(str(family) + f"-{name}.json")
    shape_file.write_text(shape.to_json())
    status, out, err = run(capsys, "chat", family, "--shape", shape_file, "--prompt", "Hi there", "--max-new-tokens", 9)
    assert status == 0, err
    assert streamed == out.removesuffix("\n")


def test_a_budget_between_the_members_is_searched_on_the_weights(server, family):
    completion = client(server).completions.create(
        model="anyshape", prompt="Hello", max_tokens=8, temperature=0, extra_body={"budget": 0.8}
    )
    assert completion.model == "anyshape@0.8"
    config = anyshape.load_config(family)
    shape = server.catalog.budget_shape(0.8)  # found by the request, kept
    assert shape not in (Shape.full(config), Shape.from_dict(HALF, config))
    assert shape.num_parameters(config) <= 0.8 * Shape.full(config).num_parameters(config)
    assert completion.choices[0].text == expected_completion(family, "Hello", shape, 8)


@pytest.fixture(scope="module")
def router_run(tiny_dir, tmp_path_factory) -> Path:
    """A `train --router` run of the tiny Llama 3 (a few steps: the router's choices, not their quality)."""
    root = tmp_path_factory.mktemp("router")
    data = root / "train.txt"
    data.write_text(" ".join(f"Sentence {i} counts to {i % 9}." for i in range(200)))
    settings = TrainSettings(
        model=str(tiny_dir("llama3-gqa")), data=str(data), out=str(root / "run"), router=True, align=16,
        fractions=(0.25, 0.5, 0.75, 1.0), anchors=(0.25, 0.5, 0.75), steps=3, batch_size=2, seq_len=32,
        save_every=3, eval_every=3, warmup_steps=1, val_batches=1,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ANYSHAPE_CACHE", str(root / "cache"))
        train(settings, controller=RouterControl)
    return Path(settings.out)


def test_a_router_run_serves_any_budget_by_its_router(router_run):
    with serving(router_run) as running:
        api = client(running)
        names = [model.id for model in api.models.list().data]
        assert names == ["anyshape", "anyshape@1", "anyshape@0.75", "anyshape@0.5", "anyshape@0.25"]
        completion = api.completions.create(
            model="anyshape", prompt="Hello", max_tokens=6, temperature=0, extra_body={"budget": 0.6}
        )
    assert completion.model == "anyshape@0.6"
    router = load_router(router_run)
    shape = router.route(Budget(0.6, router.basis)).shape
    assert shape != Shape.full(router.space.config)
    assert completion.choices[0].text == expected_completion(router_run, "Hello", shape, 6)


def test_concurrent_requests_decode_together_and_answer_as_sequential_ones(server):
    api = client(server)

    def complete(prompt: str) -> str:
        answer = api.completions.create(model="anyshape@0.5", prompt=prompt, max_tokens=16, temperature=0)
        return answer.choices[0].text

    sequential = [complete(prompt) for prompt in PROMPTS]
    model, batches = server.engine.model, []
    hidden_states = model.hidden_states
    model.hidden_states = lambda ids, *args: batches.append(ids.shape[0]) or hidden_states(ids, *args)
    try:
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            concurrent = list(pool.map(complete, PROMPTS))
    finally:
        del model.hidden_states
    assert concurrent == sequential
    assert max(batches) > 1  # some decode steps ran several requests at once


def test_a_bounded_load_of_mixed_sizes_is_answered_in_full(server):
    """200 requests, 8 at a time, by name, budget and latency: no errors, every one answered."""
    asks = [{"model": "anyshape"}, {"model": "anyshape@0.5"}, {"model": "anyshape", "budget": 0.8},
            {"model": "anyshape", "max_latency_ms": 1e6}]  # fmt: skip

    def ask(i: int) -> tuple[int, dict]:
        body = {**asks[i % len(asks)], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 4, "temperature": 0}
        status, answer, _ = post(server, "/v1/completions", body)
        return status, answer

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(200)))
    assert [status for status, _ in answers] == [200] * 200
    assert all(answer["usage"]["completion_tokens"] == 4 for _, answer in answers)


def test_sampling_is_reproducible_by_seed(server):
    api = client(server)

    def sample(seed: int) -> str:
        answer = api.completions.create(model="anyshape", prompt="abc", max_tokens=12, temperature=1, seed=seed)
        return answer.choices[0].text

    assert sample(3) == sample(3)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_a_stop_string_ends_the_answer_before_it(server, family):
    api = client(server)
    full = api.completions.create(model="anyshape", prompt="Hello", max_tokens=16, temperature=0).choices[0].text
    stop = full[5:7]
    assert len(stop) == 2
    cut = api.completions.create(model="anyshape", prompt="Hello", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = api.completions.create(
        model="anyshape", prompt="Hello", max_tokens=16, temperature=0, stop=stop, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == full[: full.index(stop)]


BAD = [
    ({"model": "nope", "prompt": "x"}, 404, "unknown model"),
    ({"model": "anyshape", "prompt": "x", "budget": 1.5}, 400, "outside (0, 1]"),
    ({"model": "anyshape", "prompt": "x", "budget": 0.5, "max_latency_ms": 5}, 400, "not both"),
    ({"model": "anyshape", "prompt": "x" * 300}, 400, "reads at most 256"),
    ({"model": "anyshape", "prompt": "x", "max_tokens": 5000}, 400, "max_tokens=5000 is too large"),
    ({"model": "anyshape", "prompt": "x", "presence_penalty": 0.5, "logprobs": 2}, 400, "logprobs, presence_penalty"),
    ({"model": "anyshape", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "anyshape"}, 400, "prompt"),
    ({"model": "anyshape", "prompt": "x", "max_latency_ms": 1e-6}, 400, "no size decodes within"),
    (b"{not json", 400, "not valid JSON"),
]


@pytest.mark.parametrize(("body", "status", "words"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_a_bad_request_gets_its_4xx_and_the_server_goes_on(server, body, status, words):
    answered, error, _ = post(server, "/v1/completions", body)
    assert answered == status
    assert words in error["error"]["message"]
    assert set(error["error"]) == {"message", "type", "param", "code"}
    answered, good, _ = post(server, "/v1/completions", {"model": "anyshape", "prompt": "ok", "max_tokens": 2})
    assert answered == 200 and good["choices"][0]["finish_reason"] in ("stop", "length")


def test_health_and_metrics(server):
    with urllib.request.urlopen(f"{server.address}/health") as response:
        assert json.loads(response.read()) == {"status": "ok"}
    post(server, "/v1/completions", {"model": "anyshape@0.5", "prompt": "ok", "max_tokens": 3, "temperature": 0})
    with urllib.request.urlopen(f"{server.address}/metrics") as response:
        text = response.read().decode()
    assert 'anyshape_requests_total{model="anyshape@0.5"}' in text
    assert 'anyshape_tokens_per_second{model="anyshape@0.5"}' in text
    assert 'anyshape_waiting_requests{model="anyshape@0.5"} 0.0' in text


@contextmanager
def slowed(model, seconds: float):
    """Each forward of `model` takes `seconds` longer: requests stay in flight long enough to watch."""
    hidden_states = model.hidden_states
    model.hidden_states = lambda *args: time.sleep(seconds) or hidden_states(*args)
    try:
        yield
    finally:
        del model.hidden_states


def test_a_full_queue_answers_429_and_a_busy_size_degrades(family):
    with serving(family, max_batch=1, max_waiting=1) as server, slowed(server.engine.model, 0.02):
        api = client(server)
        long = {"model": "anyshape", "prompt": "abc", "max_tokens": 200, "temperature": 0}
        first = api.completions.create(**long, stream=True)  # runs: the size's one slot
        next(iter(first))
        degraded = api.completions.create(
            model="anyshape", prompt="abc", max_tokens=2, temperature=0, extra_body={"degrade": True}
        )
        assert degraded.model == "anyshape@0.5"
        second = api.completions.create(**long, stream=True)  # waits: the queue's one place
        time.sleep(0.2)
        status, error, headers = post(server, "/v1/completions", {"model": "anyshape", "prompt": "x"})
        assert status == 429 and headers["Retry-After"] == "1" and error["error"]["code"] == "queue_full"
        first.close()
        second.close()


def test_a_client_that_leaves_a_whole_answer_frees_its_slot(family):
    with serving(family, max_batch=1) as server, slowed(server.engine.model, 0.05):
        whole = server.engine.model.full_shape
        body = {"model": "anyshape", "prompt": "abc", "max_tokens": 200, "temperature": 0}  # 10 s or more
        headers = {"Content-Type": "application/json"}
        request = urllib.request.Request(f"{server.address}/v1/completions", json.dumps(body).encode(), headers)
        with pytest.raises(TimeoutError):
            urllib.request.urlopen(request, timeout=0.5)  # gives up and closes the connection
        deadline = time.monotonic() + 3
        while server.engine.busy(whole):
            assert time.monotonic() < deadline, "the answer nobody waits for still runs"
            time.sleep(0.05)
        assert post(server, "/v1/completions", {**body, "max_tokens": 2})[0] == 200


def test_shutdown_finishes_what_is_in_flight_and_refuses_new_requests(family):
    with serving(family, max_batch=2) as server, slowed(server.engine.model, 0.01):
        api = client(server)
        stream = api.completions.create(model="anyshape", prompt="abc", max_tokens=120, temperature=0, stream=True)
        chunks = [next(iter(stream))]
        server.handle_exit(signal.SIGINT, None)
        status, error, _ = post(server, "/v1/completions", {"model": "anyshape", "prompt": "x"})
        assert status == 503 and error["error"]["code"] == "shutting_down"
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        text = "".join(chunk.choices[0].text for chunk in chunks)
        assert text == expected_completion(family, "abc", None, 120)


def test_the_engine_queue_is_bounded(tiny_dir):
    engine = Engine(anyshape.load(tiny_dir("llama3-gqa")), max_batch=1, max_waiting=1)  # not started: nothing runs

    def request() -> Request:
        model = engine.model
        return Request([1, 2], model.full_shape, 4, Sampling(), frozenset(), lambda token: None, lambda reason: None)

    engine.submit(request())
    with pytest.raises(QueueFull):
        engine.submit(request())


def test_serve_refuses_bad_options_in_one_line(capsys):
    status, _, err = run(capsys, "serve", "smollm2-135m", "--name", "a@b")
    assert status == 2 and "without '@'" in err and "Traceback" not in err
    status, _, err = run(capsys, "serve", "smollm2-135m", "--dtype", "int3")
    assert status == 2 and "int3" in err


def resident_bytes() -> int:
    """This process's resident memory (Linux)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="reads /proc (Linux)")
def test_four_sizes_take_the_memory_of_one(tmp_path):
    """One copy of 48 MB of weights serves every size: a copy per size would add 100 MB."""
    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = anyshape.load(tmp_path)
    full = model.full_shape
    shapes = [full] + [Shape.from_dict({"hidden_size": h, "intermediate_size": f}, model.config)
                       for h, f in ((384, 1024), (256, 768), (128, 512))]  # fmt: skip
    engine = Engine(model, max_batch=4).start()
    finished = threading.Semaphore(0)

    def serve(shape_list) -> None:
        for shape in shape_list:
            engine.submit(Request(list(range(64)), shape, 32, Sampling(), frozenset(), lambda token: None,
                                  lambda reason: finished.release()))  # fmt: skip
        for _ in shape_list:
            assert finished.acquire(timeout=120)

    try:
        serve([full] * 4)
        one = resident_bytes()
        serve(shapes * 4)
        four = resident_bytes()
    finally:
        engine.close()
    assert four <= 1.1 * one, f"{four / 2**20:.0f} MiB serving four sizes against {one / 2**20:.0f} MiB serving one"
