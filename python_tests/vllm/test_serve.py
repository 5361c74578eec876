"""One real ``vllm serve`` process on localhost with the plugin: an OpenAI chat request with an
image at the server-wide ratio (``--hf-overrides``) and at a per-request ratio
(``extra_body={"mm_processor_kwargs": ...}``) answers what transformers + divprune_ext.hf
answers at that ratio; a bad ratio is HTTP 400 and the next request is served.

vLLM 0.32's server refuses every per-request ``mm_processor_kwargs`` unless it is started with
``--trust-request-mm-kwargs`` (its own gate, which the plugin leaves alone): the server here is.
"""
import base64
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest

import checkpoints
import harness

openai = pytest.importorskip("openai")

SERVER_RATIO = 0.5
PROMPT = ["what is in the image ?", ("image", (60, 50))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = checkpoints.build("llava", str(tmp_path_factory.mktemp("serve") / "llava"))
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve-log") / "server.log", "w+")
    command = [sys.executable, "-P", "-m", "vllm.entrypoints.cli.main", "serve", path, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
               "--hf-overrides", json.dumps({"divprune_keep_ratio": SERVER_RATIO}), "--seed", "0",
               "--trust-request-mm-kwargs"]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    deadline = time.time() + 300
    while True:
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            if process.poll() is not None or time.time() > deadline:
                log.seek(0)
                process.kill()
                pytest.fail(f"vllm serve did not start:\n{log.read()[-6000:]}")
            time.sleep(2)
    yield client, path
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


def chat(client, path, mm_processor_kwargs=None):
    image = harness.media(PROMPT)["image"][0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the server decodes the same pixels
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    extra = {"mm_processor_kwargs": mm_processor_kwargs} if mm_processor_kwargs is not None else {}
    return client.chat.completions.create(
        model=path, temperature=0, max_tokens=harness.MAX_NEW_TOKENS,
        messages=[{"role": "user", "content": [{"type": "text", "text": PROMPT[0]},
                                               {"type": "image_url", "image_url": {"url": url}}]}],
        extra_body={"ignore_eos": True, "skip_special_tokens": True, **extra})


def expected(path, ratio):
    from transformers import AutoTokenizer
    text = AutoTokenizer.from_pretrained(path).decode(harness.hf_generate(path, PROMPT, ratio), skip_special_tokens=True)
    prompt_tokens = len(harness.hf_inputs(path, PROMPT)["input_ids"][0]) - 16 + max(1, round(16 * ratio))
    return text, prompt_tokens


@pytest.mark.parametrize("ratio", [None, 0.25, 1.0])
def test_chat_with_an_image(server, ratio):
    client, path = server
    reply = chat(client, path, None if ratio is None else {"divprune_keep_ratio": ratio})
    text, prompt_tokens = expected(path, SERVER_RATIO if ratio is None else ratio)
    assert reply.usage.prompt_tokens == prompt_tokens
    # word-level tokenizer: equal words = equal tokens (the server's streaming detokenizer adds a leading space)
    assert reply.choices[0].message.content.split() == text.split()


@pytest.mark.parametrize("bad", [2.0, 0, "half"])
def test_bad_ratio_is_http_400_and_the_server_goes_on(server, bad):
    client, path = server
    with pytest.raises(openai.BadRequestError) as error:
        chat(client, path, {"divprune_keep_ratio": bad})
    assert error.value.status_code == 400 and "divprune_keep_ratio" in str(error.value)
    assert chat(client, path).choices[0].message.content.split() == expected(path, SERVER_RATIO)[0].split()
