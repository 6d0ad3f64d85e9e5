"""`anyshape chat`: one scripted answer with --prompt, the chat template or plain text, a kept
conversation, an interactive session in a terminal, and exit 2 for bad input."""

import io
import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import anyshape
from anyshape.runtime.chat import Chat, stop_tokens
from anyshape.runtime.generate import generate
from tests.conftest import byte_tokenizer
from tests.unit.test_cli import assert_bad_input, run

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


@pytest.fixture(scope="module")
def chat_model(tiny_dir, tmp_path_factory) -> Path:
    """The tiny Llama 3 model with a chat template and an end-of-sequence token in its tokenizer."""
    folder = tmp_path_factory.mktemp("chat") / "model"
    shutil.copytree(tiny_dir("llama3-gqa"), folder)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = TEMPLATE
    tokenizer.eos_token = "Ċ"  # the byte-level symbol of "\n", token 198
    tokenizer.save_pretrained(folder)
    return folder


def expected_answer(folder: Path, prompt: str, max_new_tokens: int) -> str:
    """The greedy answer after the text `prompt`, decoded: what `chat` must print."""
    model, tokenizer = anyshape.load(folder), anyshape.load_tokenizer(folder)
    prompt_ids = tokenizer(prompt)["input_ids"]
    tokens = generate(model, prompt_ids, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens(tokenizer, model))
    return tokenizer.decode(list(tokens), skip_special_tokens=True)


def test_chat_prompt_answers_through_the_chat_template(capsys, chat_model):
    status, out, err = run(
        capsys, "chat", chat_model, "--prompt", "Hello", "--system", "Be brief.", "--max-new-tokens", 12
    )
    assert status == 0, err
    rendered = "[system] Be brief.\n[user] Hello\n[assistant] "
    expected = expected_answer(chat_model, rendered, 12)
    assert expected  # the test means something only if the model says anything
    assert out == expected + "\n"
    assert "no chat template" not in err


def test_chat_without_a_template_continues_plain_text(capsys, tiny_dir):
    folder = tiny_dir("qwen2-gqa")  # the byte tokenizer has no chat template
    status, out, err = run(capsys, "chat", folder, "--prompt", "Once upon a time", "--max-new-tokens", 10)
    assert status == 0, err
    assert "has no chat template" in err and "plain text" in err
    assert out == expected_answer(folder, "Once upon a time", 10) + "\n"


def test_chat_at_a_shape_answers_as_the_exported_shape(capsys, tiny_dir, tmp_path):
    shape = '{"layers": [0, 2], "intermediate_size": 48}'
    status, out, _ = run(capsys, "extract", tiny_dir("qwen2-gqa"), "--shape", shape, "--out", tmp_path / "small")
    assert status == 0
    status, at_shape, err = run(capsys, "chat", tiny_dir("qwen2-gqa"), "--shape", shape, "--prompt", "Hi")
    assert status == 0, err
    status, exported, _ = run(capsys, "chat", tmp_path / "small", "--prompt", "Hi")
    assert at_shape == exported
    status, full, _ = run(capsys, "chat", tiny_dir("qwen2-gqa"), "--prompt", "Hi")
    assert full != at_shape


def test_a_conversation_keeps_its_turns(chat_model):
    model, tokenizer = anyshape.load(chat_model), anyshape.load_tokenizer(chat_model)
    conversation = Chat(model, tokenizer)
    first = "".join(conversation.reply("Hi", max_new_tokens=6))
    second = "".join(conversation.reply("And then?", max_new_tokens=6))
    assert [m["content"] for m in conversation.messages] == ["Hi", first, "And then?", second]
    rendered = f"[user] Hi\n[assistant] {first}\n[user] And then?\n[assistant] "
    assert second == expected_answer(chat_model, rendered, 6)


def test_sampled_chat_is_reproducible(capsys, chat_model):
    args = ("chat", chat_model, "--prompt", "Hi", "--temperature", 1.0, "--top-p", 0.9, "--max-new-tokens", 16)
    first, second = run(capsys, *args, "--seed", 1), run(capsys, *args, "--seed", 1)
    assert first == second
    assert run(capsys, *args, "--seed", 2)[1] != first[1]


def test_stop_tokens_come_from_the_tokenizer_and_the_config(chat_model):
    model, tokenizer = anyshape.load(chat_model), anyshape.load_tokenizer(chat_model)
    assert stop_tokens(tokenizer, model) == {198, 2}  # "\n" from the tokenizer, 2 from config.json


@pytest.mark.integration
def test_interactive_chat_in_a_terminal(chat_model):
    """Drives `anyshape chat MODEL` through a pseudo-terminal: a message, its answer, /exit."""
    expected = "".join(Chat(anyshape.load(chat_model), anyshape.load_tokenizer(chat_model)).reply("Hi", 8))
    main_fd, replica_fd = os.openpty()
    command = [str(Path(sys.executable).with_name("anyshape")), "chat", str(chat_model), "--max-new-tokens", "8"]
    process = subprocess.Popen(
        command,
        stdin=replica_fd,
        stdout=replica_fd,
        stderr=replica_fd,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    os.close(replica_fd)
    try:
        transcript = read_until(main_fd, ">>> ", seen="")
        os.write(main_fd, b"Hi\n")
        transcript = read_until(main_fd, ">>> ", seen=transcript)
        os.write(main_fd, b"/exit\n")
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        os.close(main_fd)
    text = transcript.replace("\r", "")  # the terminal writes "\n" as "\r\n"
    assert "Chatting with" in text
    assert f">>> Hi\n{expected}\n>>> ".replace("\r", "") in text


def read_until(fd: int, marker: str, seen: str, timeout: float = 120.0) -> str:
    """Reads the terminal into `seen` until `marker` occurs once more than it did; returns it all."""
    count, deadline = seen.count(marker), time.monotonic() + timeout
    data = seen.encode()
    while data.decode(errors="replace").count(marker) <= count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {marker!r} after {timeout} s; the terminal shows:\n{data.decode(errors='replace')}"
        if select.select([fd], [], [], remaining)[0]:
            data += os.read(fd, 4096)
    return data.decode(errors="replace")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--temperature", "-1"], ["temperature=-1.0", ">= 0"]),
        (["--top-p", "0"], ["top_p=0.0", "(0, 1]"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens", "greater than or equal to 1"]),
        (["--prompt", " "], ["--prompt", "the message is empty"]),
        (["--shape", '{"num_hidden_layers": 9}'], ["num_hidden_layers", "1..4"]),
    ],
    ids=["temperature", "top-p", "max-new-tokens", "empty-prompt", "shape"],
)
def test_bad_chat_input_exits_2(capsys, tiny_dir, args, words):
    assert_bad_input(capsys, ["chat", tiny_dir("qwen2-gqa"), *args], *words)


def test_chat_with_a_missing_model_exits_2(capsys, tmp_path):
    assert_bad_input(capsys, ["chat", tmp_path / "nothing", "--prompt", "Hi"], "not found")


def test_chat_reads_messages_until_end_of_input(capsys, monkeypatch, chat_model):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\n\nAnd then?\n"))
    status, out, err = run(capsys, "chat", chat_model, "--max-new-tokens", 6)
    assert status == 0, err
    conversation = Chat(anyshape.load(chat_model), anyshape.load_tokenizer(chat_model))
    answers = ["".join(conversation.reply(message, 6)) for message in ("Hi", "And then?")]
    assert out == f">>> {answers[0]}\n>>> >>> {answers[1]}\n>>> \n"  # the empty line is skipped


@pytest.mark.slow
def test_smollm2_answers_a_question(capsys):
    status, out, err = run(capsys, "chat", "smollm2-135m", "--prompt", "What is the capital of France?")
    assert status == 0, err
    assert "Paris" in out


def test_chat_help_teaches_both_modes(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "60")  # narrow: the example lines must still not wrap
    status, out, err = run(capsys, "chat", "--help")
    assert status == 0 and err == ""
    assert out.startswith("Usage: anyshape chat [OPTIONS] {MODEL}")
    assert "\n    anyshape chat family/0.5\n" in out
    assert (
        '\n    anyshape chat smollm2-135m --shape shape.json --prompt "Explain GQA in one line" --max-new-tokens 64\n'
        in out
    )
    for option in ("--prompt", "--system", "--max-new-tokens", "--temperature", "--top-p", "--seed"):
        assert option in out
