"""`s2t serve` as a client uses it: the official openai client against a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import importlib.util
import time
from pathlib import Path

import httpx
import openai
import pytest

from s2t.api import S2TGenerator
from s2t.engine import Scheduler, decode
from s2t.methods import build_method
from s2t.prompts import build_chat_prompt
from s2t.serving import create_app, running_server

MODEL = "tiny-s2t"
CONTEXT = 256


def load_bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generator(slm, llm):
    return S2TGenerator(slm, llm=llm)


@pytest.fixture(scope="module")
def method():
    return build_method("s2t", trigger="entropy", threshold=2.0, k=4)


@pytest.fixture(scope="module")
def server(generator, method):
    """S2T with the tiny pair (the LLM is used), batches of 4."""
    app = create_app(
        generator.scheduler(method, max_batch_size=4),
        generator.tokenizer,
        model_name=MODEL,
        context_length=CONTEXT,
        default_max_tokens=16,
    )
    with running_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=60)


def alone(generator, method, messages, max_tokens):
    """What the engine decodes for this chat when it is alone in its batch."""
    prompt = build_chat_prompt(generator.tokenizer, messages)
    return decode(
        generator.slm.model, [prompt], method, llm=generator.llm.model, **generator.decode_kwargs(max_tokens)
    )[0]


def chat(content):
    return [{"role": "user", "content": content}]


def test_chat_completion_is_the_engines_answer_with_usage_and_cost(client, generator, method):
    messages = chat("Natalia sold clips to 48 of her friends.")
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
    expected = alone(generator, method, messages, 12)
    choice = response.choices[0]
    assert choice.message.content == generator.tokenizer.decode(expected.token_ids, skip_special_tokens=True)
    assert choice.finish_reason == expected.finish_reason
    assert response.usage.completion_tokens == len(expected.token_ids)
    assert response.usage.prompt_tokens == len(build_chat_prompt(generator.tokenizer, messages))
    cost = response.model_extra["s2t_cost"]
    assert cost["method"] == "s2t"
    assert cost["llm_forward_calls"] == expected.cost.llm_forward_calls
    assert cost["trigger_rate"] == pytest.approx(expected.cost.trigger_rate)


def test_streaming_concatenates_to_the_non_streaming_answer(client):
    for create, text_of, delta_of in (
        (
            client.chat.completions.create,
            lambda r: r.choices[0].message.content,
            lambda c: c.choices[0].delta.content if c.choices else None,
        ),
        (client.completions.create, lambda r: r.choices[0].text, lambda c: c.choices[0].text),
    ):
        kwargs = (
            dict(messages=chat("What is 2 + 2?"))
            if create == client.chat.completions.create
            else dict(prompt="Janet's ducks lay 16 eggs per day.")
        )
        whole = create(model=MODEL, max_tokens=10, **kwargs)
        chunks = list(create(model=MODEL, max_tokens=10, stream=True, **kwargs))
        assert "".join(delta_of(c) or "" for c in chunks) == text_of(whole)
        last = chunks[-1]
        assert last.choices[0].finish_reason == whole.choices[0].finish_reason
        assert last.usage.completion_tokens == whole.usage.completion_tokens
        assert last.model_extra["s2t_cost"]["generated_tokens"] == whole.usage.completion_tokens


def test_stop_strings_end_the_answer_before_them(client):
    messages = chat("Double 21.")
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16).choices[0]
    text = full.message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), "the tiny model's answer should have text to stop at"
    for stream in (False, True):
        response = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=16, stop=[stop], stream=stream
        )
        if stream:
            chunks = list(response)
            got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = chunks[-1].choices[0].finish_reason
        else:
            got, finish = response.choices[0].message.content, response.choices[0].finish_reason
        assert got == text[: text.index(stop)]
        assert finish == "stop"


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(f"{server}/health").json()
    assert health["status"] == "ok" and health["method"] == "s2t"


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(client, server):
    url = f"{server}/v1/chat/completions"
    good = {"model": MODEL, "messages": chat("2 + 2?"), "max_tokens": 4}
    cases = [
        (
            httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}),
            400,
            None,
            None,
        ),
        (httpx.post(url, json={**good, "model": "gpt-5"}), 404, "model", "model_not_found"),
        (httpx.post(url, json={**good, "max_tokens": -3}), 400, "max_tokens", None),
        (
            httpx.post(url, json={**good, "messages": chat("eggs " * 400)}),
            400,
            "messages",
            "context_length_exceeded",
        ),
        (httpx.post(url, json={**good, "max_tokens": CONTEXT}), 400, "max_tokens", "context_length_exceeded"),
        (httpx.post(url, json={"model": MODEL}), 400, "messages", None),
        (httpx.post(f"{server}/v1/nothing", json=good), 404, None, None),
    ]
    for response, status, param, code in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert (error["param"], error["code"]) == (param, code)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-5", messages=chat("hi"))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    assert httpx.post(url, json=good).status_code == 200


def test_a_client_disconnecting_mid_stream_frees_its_batch_slot(generator, tokenizer):
    # No stop token can be generated (a reserved id): only the disconnect can end this request early.
    scheduler = Scheduler(
        generator.slm.model,
        vocab_size=len(tokenizer),
        stop_ids=[len(tokenizer)],
        pad_id=tokenizer.pad_token_id,
        max_batch_size=2,
    )
    app = create_app(scheduler, tokenizer, model_name=MODEL, context_length=1024)
    with running_server(app) as url:
        body = {"model": MODEL, "messages": chat("2 + 2?"), "max_tokens": 900, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]
        assert all(line.startswith("data: ") or not line for line in received)
        deadline = time.monotonic() + 30
        while (health := httpx.get(f"{url}/health").json())["cancelled"] < 1:
            assert time.monotonic() < deadline, health
            time.sleep(0.05)
        assert (health["running"], health["waiting"], health["finished"]) == (0, 0, 0)
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up also frees its slot
            httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}, timeout=0.3)
        while (health := httpx.get(f"{url}/health").json())["cancelled"] < 2:
            assert time.monotonic() < deadline, health
            time.sleep(0.05)
        assert (health["running"], health["waiting"], health["finished"]) == (0, 0, 0)
        short = {**body, "max_tokens": 3, "stream": False}
        assert (
            httpx.post(f"{url}/v1/chat/completions", json=short, timeout=30).json()["usage"][
                "completion_tokens"
            ]
            == 3
        )


def test_concurrent_clients_are_all_answered_as_if_alone(server, generator, method):
    bench = load_bench()
    prompts = ["What is 2 + 2?", "Double 21.", "Natalia sold clips to 48 of her friends.", "9 * 2?"]
    result = asyncio.run(
        bench.run_load(server, MODEL, prompts, clients=16, requests=48, max_tokens=8, time_limit=120)
    )
    assert (result["requests_sent"], result["answered"], result["errors"]) == (48, 48, 0)
    assert result["latency_s"]["p95"] >= result["latency_s"]["p50"] > 0
    expected = {
        p: generator.tokenizer.decode(
            alone(generator, method, chat(p), 8).token_ids, skip_special_tokens=True
        )
        for p in prompts
    }
    assert all(r["text"] == expected[r["prompt"]] for r in result["records"])


def test_cli_serve_builds_the_app_and_loads_no_llm_for_greedy(tiny_pair_dir, monkeypatch):
    from typer.testing import CliRunner

    from s2t.cli import app as cli
    from s2t.serving import server

    served = {}
    monkeypatch.setattr(server, "serve", lambda app, host, port: served.update(app=app, host=host, port=port))
    args = [
        "serve",
        "--slm",
        tiny_pair_dir["slm"],
        "--llm",
        "/nonexistent",
        "--method",
        "greedy",
        "--port",
        "8123",
        "--model-name",
        MODEL,
        "--max-tokens",
        "5",
    ]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "no LLM loaded" in result.output
    assert (served["host"], served["port"]) == ("127.0.0.1", 8123)
    with running_server(served["app"]) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        response = client.completions.create(model=MODEL, prompt="2 + 2?")
        assert response.usage.completion_tokens <= 5
        assert response.model_extra["s2t_cost"]["llm_forward_calls"] == 0


@pytest.mark.parametrize(
    "extra, message", [(["--method", "maj@8"], "unknown method"), (["--method", "s2t-local"], "--selector")]
)
def test_cli_serve_refuses_bad_methods_with_a_message(tiny_pair_dir, extra, message):
    from typer.testing import CliRunner

    from s2t.cli import app as cli

    result = CliRunner().invoke(cli, ["serve", "--slm", tiny_pair_dir["slm"], *extra])
    assert result.exit_code == 2 and message in result.output
