"""`s2t serve` as a client uses it: the official openai client against a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
import torch

from s2t.api import S2TGenerator
from s2t.engine import Scheduler, decode
from s2t.methods import build_method
from s2t.prompts import build_chat_prompt
from s2t.serving import create_app, running_server
from tests.conftest import load_script

MODEL = "tiny-s2t"
CONTEXT = 256


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
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_streaming_usage_only_when_asked_in_a_last_chunk_without_choices(client):
    kwargs = dict(model=MODEL, messages=chat("What is 2 + 2?"), max_tokens=10)
    whole = client.chat.completions.create(**kwargs)
    for create, extra in (
        (client.chat.completions.create, kwargs),
        (
            client.completions.create,
            dict(model=MODEL, prompt="Janet's ducks lay 16 eggs per day.", max_tokens=10),
        ),
    ):
        plain = list(create(stream=True, **extra))
        assert all(c.usage is None and "s2t_cost" not in (c.model_extra or {}) for c in plain)
        assert plain[-1].choices[0].finish_reason is not None
        counted = list(create(stream=True, stream_options={"include_usage": True}, **extra))
        last = counted[-1]
        assert last.choices == [] and last.usage is not None
        assert all(c.usage is None and c.choices for c in counted[:-1])
        assert last.model_extra["s2t_cost"]["generated_tokens"] == last.usage.completion_tokens
        assert counted[-2].choices[0].finish_reason == plain[-1].choices[0].finish_reason
    assert last.usage.completion_tokens <= 10
    chat_usage = list(
        client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs)
    )
    assert chat_usage[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_developer_messages_are_system_messages(client):
    asked = [{"role": "user", "content": "Double 21."}]
    as_system = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "system", "content": "Always answer in French."}, *asked],
        max_tokens=8,
    )
    as_developer = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "developer", "content": "Always answer in French."}, *asked],
        max_tokens=8,
    )
    assert as_developer.usage.prompt_tokens == as_system.usage.prompt_tokens
    assert as_developer.choices[0].message.content == as_system.choices[0].message.content


def slm_logprobs(generator, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The SLM's log-probabilities at each position of prompt + tokens, teacher-forced, alone."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = generator.slm.model(input_ids=ids).logits[0, :, : len(generator.tokenizer)]
    return torch.log_softmax(logits.float(), -1)


def test_chat_logprobs_are_the_slms_for_the_chosen_tokens(client, generator, method):
    messages = chat("Natalia sold clips to 48 of her friends.")
    response = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, logprobs=True, top_logprobs=3
    )
    expected = alone(generator, method, messages, 10)
    prompt = build_chat_prompt(generator.tokenizer, messages)
    reference = slm_logprobs(generator, prompt, list(expected.token_ids))
    content = response.choices[0].logprobs.content
    assert len(content) == len(expected.token_ids) == response.usage.completion_tokens
    text = response.choices[0].message.content
    assert all(item.token == bytes(item.bytes).decode("utf-8", errors="replace") for item in content)
    for step, (item, token) in enumerate(zip(content, expected.token_ids)):
        row = reference[len(prompt) - 1 + step]
        assert item.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
        assert item.top_logprobs[0].logprob >= item.logprob
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == text
    streamed = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, logprobs=True, stream=True
        )
    )
    items = [
        i for c in streamed if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content
    ]
    assert [i.logprob for i in items] == pytest.approx([i.logprob for i in content], abs=1e-6)
    assert all(i.top_logprobs == [] for i in items)


def test_completion_echo_and_logprobs(client, generator):
    text = "Janet's ducks lay 16 eggs per day."
    prompt = generator.tokenizer(text, add_special_tokens=False)["input_ids"]
    response = client.completions.create(model=MODEL, prompt=text, max_tokens=6, echo=True, logprobs=2)
    choice = response.choices[0]
    generated = choice.text[len(text) :]
    assert choice.text.startswith(text)
    assert generated == client.completions.create(model=MODEL, prompt=text, max_tokens=6).choices[0].text
    logprobs = choice.logprobs
    completion = response.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(prompt) + completion
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert "".join(logprobs.tokens[: len(prompt)]) == text
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[len(prompt)] == len(text)
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    tokens = generator.tokenizer(choice.text, add_special_tokens=False)["input_ids"]
    reference = slm_logprobs(generator, prompt, [])
    for position in range(1, len(prompt)):
        row = reference[position - 1]
        assert logprobs.token_logprobs[position] == pytest.approx(float(row[prompt[position]]), abs=1e-4)
        assert max(logprobs.top_logprobs[position].values()) == pytest.approx(float(row.max()), abs=1e-4)
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs[1:])  # the top 2 and the chosen token
    for token, chosen, top in zip(
        logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:]
    ):
        # always there, as OpenAI documents (a likelier token that reads alike keeps its entry)
        assert top[token] >= chosen - 1e-6
    assert tokens[: len(prompt)] == prompt
    # max_tokens 0 with echo scores the prompt only (what lm-evaluation-harness' loglikelihood asks).
    scored = client.completions.create(model=MODEL, prompt=text, max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].text == text and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs == pytest.approx(logprobs.token_logprobs[: len(prompt)])
    chosen_only = scored.choices[0].logprobs  # logprobs 0: each position's entry is the chosen token alone
    assert chosen_only.top_logprobs[1:] == [
        {token: chosen} for token, chosen in zip(chosen_only.tokens[1:], chosen_only.token_logprobs[1:])
    ]
    streamed = list(
        client.completions.create(model=MODEL, prompt=text, max_tokens=6, echo=True, logprobs=2, stream=True)
    )
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert [
        t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens
    ] == logprobs.tokens


@pytest.mark.parametrize(
    "chat_endpoint, extra, param",
    [
        (True, {"presence_penalty": 0.5}, "presence_penalty"),
        (False, {"frequency_penalty": 0.5}, "frequency_penalty"),
        (True, {"logit_bias": {"5": 10}}, "logit_bias"),
        (False, {"best_of": 2}, "best_of"),
        (False, {"suffix": " the end"}, "suffix"),
        (False, {"max_tokens": 0}, "max_tokens"),
        (True, {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        (True, {"tool_choice": "required"}, "tool_choice"),
        (True, {"response_format": {"type": "json_object"}}, "response_format"),
        (True, {"top_logprobs": 2}, "top_logprobs"),
        (True, {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        (False, {"logprobs": 21}, "logprobs"),
        (True, {"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_unimplemented_parameters_get_a_400_naming_them(client, chat_endpoint, extra, param):
    with pytest.raises(openai.BadRequestError) as raised:
        if chat_endpoint:
            client.chat.completions.create(model=MODEL, messages=chat("hi"), max_tokens=2, **extra)
        else:
            client.completions.create(model=MODEL, prompt="hi", **{"max_tokens": 2, **extra})
    assert raised.value.body["param"] == param
    assert param in raised.value.body["message"]


def test_health_counts_stop_string_finishes_as_finished(generator, tokenizer):
    # No stop token can be generated (a reserved id): every answer runs to max_tokens unless stopped.
    scheduler = Scheduler(
        generator.slm.model,
        vocab_size=len(tokenizer),
        stop_ids=[len(tokenizer)],
        pad_id=tokenizer.pad_token_id,
        max_batch_size=2,
    )
    app = create_app(scheduler, tokenizer, model_name=MODEL, context_length=CONTEXT, default_max_tokens=16)
    with running_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        messages = chat("Double 21.")
        text = client.chat.completions.create(model=MODEL, messages=messages).choices[0].message.content
        stop = next(text[i : i + 2] for i in range(len(text) // 2, len(text)) if text[i : i + 2].strip())
        for stream in (False, True):
            response = client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=16, stop=[stop], stream=stream
            )
            list(response) if stream else None
        deadline = time.monotonic() + 30
        while (health := httpx.get(f"{url}/health").json())["finished"] + health["cancelled"] < 3:
            assert time.monotonic() < deadline, health
            time.sleep(0.05)
        assert (health["finished"], health["cancelled"]) == (3, 0)


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
        # the request as a whole is checked before any prompt is read
        (
            httpx.post(f"{server}/v1/completions", json={"model": "gpt-5", "prompt": [10**9]}),
            404,
            "model",
            "model_not_found",
        ),
        (
            httpx.post(url, json={**good, "model": "gpt-5", "messages": chat("eggs " * 400)}),
            404,
            "model",
            "model_not_found",
        ),
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
        # a seed torch cannot take killed the engine thread, after which nothing was answered
        (httpx.post(url, json={**good, "seed": 10**23, "temperature": 1}), 400, "seed", None),
        (httpx.post(url, json={**good, "seed": 2**64, "stream": True}), 400, "seed", None),
        # strings and bools are not coerced: a client's type bug is not answered as if meant
        (httpx.post(url, json={**good, "stream": "yes"}), 400, "stream", None),
        (httpx.post(url, json={**good, "max_tokens": "5"}), 400, "max_tokens", None),
        (
            httpx.post(
                url,
                content=b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800 hi"}]}'
                % MODEL.encode(),
                headers={"content-type": "application/json"},
            ),
            400,
            "messages",
            None,
        ),
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
    assert httpx.post(url, json={**good, "seed": -(2**63), "temperature": 1}).status_code == 200
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_health_answers_503_once_the_engine_thread_has_stopped(generator, method):
    scheduler = generator.scheduler(method, max_batch_size=2)
    app = create_app(scheduler, generator.tokenizer, model_name=MODEL, context_length=CONTEXT)
    with running_server(app) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        app.state.worker.stop()
        response = httpx.get(f"{url}/health")
        assert response.status_code == 503 and response.json()["status"] == "error", response.text


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
    bench = load_script("bench/serve_load.py")
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


def test_short_request_behind_a_chunked_long_prompt_gets_its_own_answer(generator, method):
    bench = load_script("bench/serve_load.py")
    app = create_app(
        generator.scheduler(method, max_batch_size=4, prefill_chunk=16),
        generator.tokenizer,
        model_name=MODEL,
        context_length=CONTEXT,
        default_max_tokens=16,
    )
    long = bench.long_prompt(20, ["Natalia sold clips to 48 of her friends in April."])
    assert len(long.split()) == 20 + 9  # the words, then the instruction
    with running_server(app) as url:
        result = asyncio.run(
            bench.run_behind_long_prompt(url, MODEL, long, "Double 21.", delay=0.05, max_tokens=6)
        )
        alone_result = asyncio.run(bench.run_behind_long_prompt(url, MODEL, None, "Double 21.", max_tokens=6))
    assert alone_result["long"] is None and alone_result["short"]["text"] == result["short"]["text"]
    assert result["long"]["prompt_tokens"] > 16  # read in chunks
    assert result["short"]["latency_s"] > 0 and result["short"]["completion_tokens"] <= 6
    expected = alone(generator, method, chat("Double 21."), 6)
    assert result["short"]["text"] == generator.tokenizer.decode(expected.token_ids, skip_special_tokens=True)


def test_cli_serve_builds_the_app_and_loads_no_llm_for_greedy(tiny_pair_dir, monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from s2t.cli import app as cli
    from s2t.serving import server

    served = {}
    monkeypatch.setattr(server, "serve", lambda app, host, port: served.update(app=app, host=host, port=port))
    (tmp_path / "llm").mkdir()  # a model directory in name only: loading it would fail
    (tmp_path / "llm" / "config.json").write_text("{}")
    args = [
        "serve",
        "--slm",
        tiny_pair_dir["slm"],
        "--llm",
        str(tmp_path / "llm"),
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
    "extra, message",
    [
        (["--method", "maj@8"], "unknown method"),
        (["--method", "s2t-local"], "--selector"),
        (["--method", "s2t-local:lora"], "serve 's2t-local'"),
        (["--method", "s2t:x:y"], "unknown method 's2t:x:y'"),  # as typed, not an emoji code
    ],
)
def test_cli_serve_refuses_bad_methods_with_a_message(tiny_pair_dir, extra, message):
    from typer.testing import CliRunner

    from s2t.cli import app as cli

    result = CliRunner().invoke(cli, ["serve", "--slm", tiny_pair_dir["slm"], *extra])
    assert result.exit_code == 2 and message in result.output


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--port", "70000"], "--port"),
        (["--port", "-1"], "--port"),
        (["--port", "0"], "--port"),
        (["--prefill-chunk", "-1"], "--prefill-chunk"),
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--context-length", "0"], "--context-length"),
    ],
)
def test_cli_serve_refuses_out_of_range_options_before_loading_models(
    tiny_pair_dir, monkeypatch, extra, option
):
    """--port 70000 used to load the models and then print a long OverflowError from bind."""
    from typer.testing import CliRunner

    import s2t.backends
    from s2t.cli import app as cli

    def no_loading(*args, **kwargs):
        raise AssertionError("models were loaded for a command refused at option parsing")

    monkeypatch.setattr(s2t.backends, "make_generator", no_loading)
    wide = {"COLUMNS": "400", "TERMINAL_WIDTH": "400"}  # one line per message, whatever the terminal
    args = ["serve", "--slm", tiny_pair_dir["slm"], *extra]
    result = CliRunner().invoke(cli, args, terminal_width=400, env=wide)
    message = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in message
    assert "Traceback" not in result.output


def test_cli_serve_refuses_a_context_length_beyond_the_models_positions(tiny_pair_dir, slm, monkeypatch):
    """A 2,400-token prompt used to be accepted past the model's trained positions."""
    from typer.testing import CliRunner

    from s2t.cli import app as cli
    from s2t.serving import server

    monkeypatch.setattr(
        server, "serve", lambda app, host, port: pytest.fail("served with a bad --context-length")
    )
    most = slm.model.config.max_position_embeddings
    args = ["serve", "--slm", tiny_pair_dir["slm"], "--method", "greedy", "--context-length", str(most + 1)]
    result = CliRunner().invoke(cli, args)
    message = " ".join(result.output.split())
    assert result.exit_code == 2 and f"--context-length {most + 1} exceeds" in message, message
    assert f"{most} positions; give at most {most}" in message


def test_cli_serve_takes_prefill_chunk_0_as_off(tiny_pair_dir, monkeypatch):
    from typer.testing import CliRunner

    from s2t.cli import app as cli
    from s2t.serving import server

    served = {}
    monkeypatch.setattr(server, "serve", lambda app, host, port: served.update(app=app, port=port))
    args = ["serve", "--slm", tiny_pair_dir["slm"], "--prefill-chunk", "0", "--port", "65535"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert served["port"] == 65535 and served["app"].state.worker.scheduler.prefill_chunk is None


def test_cli_serve_serves_the_llm_alone_with_its_cost_in_the_llm_columns(
    tiny_pair_dir, slm, llm, monkeypatch
):
    """README: the baseline `llm` is accepted alike by generate, serve and eval; it decodes as
    `s2t generate --method llm` does (greedy with the LLM), and its passes are the LLM's."""
    from typer.testing import CliRunner

    from s2t.cli import app as cli
    from s2t.serving import server

    served = {}
    monkeypatch.setattr(server, "serve", lambda app, host, port: served.update(app=app))
    args = ["serve", "--slm", tiny_pair_dir["slm"], "--llm", tiny_pair_dir["llm"], "--method", "llm"]
    result = CliRunner().invoke(cli, [*args, "--max-tokens", "6", "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert "with llm (LLM loaded)" in result.output
    question = "Natalia sold clips to 48 of her friends."
    expected = S2TGenerator(slm, llm=llm).generate(question, "llm", max_new_tokens=6, system_prompt=None)[0]
    with running_server(served["app"]) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        [card] = client.models.list().data
        response = client.chat.completions.create(model=card.id, messages=chat(question), max_tokens=6)
    assert card.id == tiny_pair_dir["llm"]  # the model served is the LLM
    assert card.model_extra["s2t_method"] == {"name": "llm", "decoder": "the LLM alone"}
    assert response.choices[0].message.content == expected.text
    cost = response.model_extra["s2t_cost"]
    assert cost["method"] == "llm" and cost["slm_forward_calls"] == 0
    assert cost["llm_forward_calls"] == expected.cost.llm_forward_calls > 0


def test_an_answer_ended_by_a_stop_string_counts_the_same_tokens_and_cost_every_time(
    client, server, tokenizer
):
    """The stop string is found on the engine thread and ends the request before its next step: the
    usage and cost used to include the steps decoded before a cancel from the event loop took effect."""
    messages = chat("Double 21.")
    full = (
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16)
        .choices[0]
        .message.content
    )
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    body = {"model": MODEL, "messages": messages, "max_tokens": 16, "stop": [stop]}
    answers = [httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60).json() for _ in range(4)]
    counted = {
        (
            a["usage"]["completion_tokens"],
            a["s2t_cost"]["generated_tokens"],
            a["s2t_cost"]["slm_forward_calls"],
        )
        for a in answers
    }
    assert len(counted) == 1, counted
    ((tokens, generated, _),) = counted
    assert tokens == generated
    # exactly the tokens up to the one that completes the stop string
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    first = next(
        n for n in range(1, len(ids) + 1) if stop in tokenizer.decode(ids[:n], skip_special_tokens=True)
    )
    assert tokens == first


@pytest.mark.parametrize(
    "messages, max_tokens, param, message",
    [
        ([{"role": "user"}], 2, "messages.0", "a user message needs its content"),
        ([{"role": "user", "content": None}], 2, "messages.0", "a user message needs its content"),
        ([{"role": "system", "content": None}, {"role": "user", "content": "hi"}], 2, "messages.0", "system"),
        ([{"role": "user", "content": "hi"}], 0, "max_tokens", "greater than or equal to 1"),
        ([{"role": "user", "content": "hi"}], -1, "max_tokens", "greater than or equal to 1"),
    ],
)
def test_a_chat_message_without_content_or_max_tokens_below_one_gets_a_400(
    server, messages, max_tokens, param, message
):
    """Both used to be answered (from an empty prompt), and -1 and 0 got contradicting messages."""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens}
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=30)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"].startswith(param) and message in error["message"], (
        error
    )


def test_a_list_of_prompts_gets_one_choice_each_as_if_each_were_asked_alone(client, generator):
    texts = ["Janet's ducks lay 16 eggs per day.", "2 + 2 =", "Natalia sold clips"]
    alone = [client.completions.create(model=MODEL, prompt=t, max_tokens=6) for t in texts]
    together = client.completions.create(model=MODEL, prompt=texts, max_tokens=6)
    assert [c.index for c in together.choices] == [0, 1, 2]
    assert [c.text for c in together.choices] == [a.choices[0].text for a in alone]
    assert [c.finish_reason for c in together.choices] == [a.choices[0].finish_reason for a in alone]
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert getattr(together.usage, field) == sum(getattr(a.usage, field) for a in alone)
    cost = together.model_extra["s2t_cost"]
    assert cost["generated_tokens"] == together.usage.completion_tokens
    assert cost["llm_forward_calls"] == sum(a.model_extra["s2t_cost"]["llm_forward_calls"] for a in alone)
    # token ids, as lm-evaluation-harness sends them, are the same prompts
    ids = [generator.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, echo=True)
    assert [c.text for c in by_ids.choices] == [t + a.choices[0].text for t, a in zip(texts, alone)]
    one = client.completions.create(model=MODEL, prompt=ids[1], max_tokens=6)
    assert one.choices[0].text == alone[1].choices[0].text
    # streamed: the chunks interleave, each names its choice; each choice's text is the same
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=texts, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
    )
    streamed, finishes = ["", "", ""], [None, None, None]
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        streamed[choice.index] += choice.text
        finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert streamed == [a.choices[0].text for a in alone]
    assert finishes == [c.finish_reason for c in together.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage == together.usage


def test_bad_completion_prompts_get_a_400_naming_the_prompt(server, generator):
    url = f"{server}/v1/completions"
    vocab = len(generator.tokenizer)
    for prompt, says in [
        ([], "empty"),
        ([[1, 2], []], "empty"),
        ([5, vocab], f"token id {vocab} in the prompt is outside the vocabulary"),
        ([[5, -1]], "token id -1"),
        ([[1, 2], [5, vocab]], f"token id {vocab} in prompt 2 of 2 is outside the vocabulary"),
        (["a", [1, 2]], None),  # a list mixing texts and token ids is no prompt shape
        ([1, "2"], None),
    ]:
        response = httpx.post(url, json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
        assert response.status_code == 400, (prompt, response.text)
        error = response.json()["error"]
        assert error["param"].startswith("prompt"), error
        assert says is None or says in error["message"], error
    assert httpx.post(url, json={"model": MODEL, "prompt": [[5, 6]], "max_tokens": 2}).status_code == 200
    lone_surrogate = b'{"model": "%s", "prompt": ["ok", "bad \\ud800"]}' % MODEL.encode()
    response = httpx.post(url, content=lone_surrogate, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith("prompt 2 of 2 is not valid Unicode"), response.text


def test_vllms_tokenizer_endpoints_serve_lm_evals_remote_tokenizer(server, generator):
    lm_eval_utils = pytest.importorskip("lm_eval.utils")
    tokenizer = generator.tokenizer
    text = "Janet's ducks lay 16 eggs per day."
    base = f"{server}/v1/completions"
    assert lm_eval_utils.check_remote_tokenizer_support(base)
    remote = lm_eval_utils.RemoteTokenizer(base)
    assert remote.encode(text) == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert remote.decode(remote.encode(text)) == text
    assert remote.eos_token == tokenizer.eos_token and remote.eos_token_id == tokenizer.eos_token_id
    messages = chat("2 + 2?")
    tokenized = httpx.post(f"{server}/tokenize", json={"model": MODEL, "messages": messages}).json()
    assert tokenized["tokens"] == build_chat_prompt(tokenizer, messages)
    assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] == CONTEXT
    for path, body, param in [
        ("/tokenize", {"prompt": "a", "model": "gpt-5"}, "model"),
        ("/tokenize", {"prompt": "a", "messages": messages}, None),
        ("/detokenize", {"tokens": [len(tokenizer)]}, "tokens"),
        ("/detokenize", {"tokens": ["1"]}, "tokens.0"),
    ]:
        response = httpx.post(f"{server}{path}", json=body)
        assert response.status_code in (400, 404) and response.json()["error"]["param"] == param, (
            response.text
        )


def test_lm_evals_local_completions_model_scores_and_generates_through_the_server(server, client, generator):
    """lm-evaluation-harness' own client (``--model local-completions``) against ``s2t serve``: its
    batched token-id prompts, its loglikelihood (echo with logprobs) and its generate_until."""
    pytest.importorskip("tenacity")  # lm_eval[api]
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(
        base_url=f"{server}/v1/completions",
        model=MODEL,
        tokenizer_backend="remote",
        batch_size=2,
        max_retries=1,
    )
    tokenizer = generator.tokenizer
    pairs = [
        ("Question: 2 + 3?\nAnswer:", " 5"),
        ("Question: 2 + 3?\nAnswer:", " 6 apples"),
        ("Hi", " there"),
    ]
    scores = lm.loglikelihood(
        [Instance("loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)],
        disable_tqdm=True,
    )
    for (context, continuation), (score, _) in zip(pairs, scores):
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        reference = slm_logprobs(generator, context_ids, continuation_ids)
        expected = sum(
            float(reference[len(context_ids) - 1 + i, token]) for i, token in enumerate(continuation_ids)
        )
        assert score == pytest.approx(expected, abs=1e-3)
    prompts = ["Question: 2 + 3?\nAnswer:", "Janet's ducks lay 16 eggs per day."]
    until = ["\n\n", "Question:", "</s>", "<|im_end|>", "<|endoftext|>"]  # five: more than OpenAI's 4
    answers = lm.generate_until(
        [
            Instance("generate_until", doc={}, arguments=(p, {"until": until, "max_gen_toks": 6}), idx=i)
            for i, p in enumerate(prompts)
        ],
        disable_tqdm=True,
    )
    expected = [
        client.completions.create(model=MODEL, prompt=p, max_tokens=6, stop=until).choices[0].text
        for p in prompts
    ]
    assert answers == expected


def test_scoring_a_prompt_fills_the_context_and_is_counted_in_the_cost(server, generator):
    url = f"{server}/v1/completions"
    score = {"model": MODEL, "max_tokens": 0, "echo": True, "logprobs": 0}
    full = httpx.post(url, json={**score, "prompt": [42] * CONTEXT})  # 256 + 0 fits a 256 context
    assert full.status_code == 200, full.text
    over = httpx.post(url, json={**score, "prompt": [42] * (CONTEXT + 1)}).json()["error"]
    assert over["code"] == "context_length_exceeded" and "asks for 0" not in over["message"]
    cost = full.json()["s2t_cost"]
    assert (cost["slm_forward_calls"], cost["slm_forward_tokens"], cost["generated_tokens"]) == (
        1,
        CONTEXT,
        0,
    )
    # echo with logprobs and decoding: the prompt's scoring pass is counted beside the decoding's
    text = "Janet's ducks lay 16 eggs per day."
    plain = httpx.post(url, json={"model": MODEL, "prompt": text, "max_tokens": 4}).json()["s2t_cost"]
    echoed = httpx.post(
        url, json={"model": MODEL, "prompt": text, "max_tokens": 4, "echo": True, "logprobs": 1}
    )
    cost = echoed.json()["s2t_cost"]
    prompt = len(generator.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert cost["slm_forward_calls"] == plain["slm_forward_calls"] + 1
    assert cost["slm_forward_tokens"] == plain["slm_forward_tokens"] + prompt
    # in a list, an error names which prompt
    listed = httpx.post(url, json={**score, "prompt": [[5, 6], [42] * (CONTEXT + 1)]}).json()["error"]
    assert "prompt 2 of 2 has 257 tokens" in listed["message"], listed
    empty = httpx.post(url, json={"model": MODEL, "max_tokens": 2, "prompt": ["fine", ""]}).json()["error"]
    assert empty["message"] == "prompt 2 of 2 is empty"


def test_badly_typed_prompts_and_logprobs_get_a_message_naming_the_shapes_taken(server):
    url = f"{server}/v1/completions"
    for prompt in ([[[42]]], [True, False], [42.0], ["Hi", [42, 71]], [42, [71]], None, {"a": 1}):
        response = httpx.post(url, json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "prompt", (prompt, error)
        assert error["message"] == (
            "prompt: takes a string, a list of strings, a list of token ids or a list of token-id lists"
        )
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    assert httpx.post(url, json={**body, "logprobs": False}).json()["choices"][0]["logprobs"] is None
    refused = httpx.post(url, json={**body, "logprobs": True}).json()["error"]
    assert refused["param"] == "logprobs" and "not true" in refused["message"]
    content = [{"type": "image_url", "image_url": {"url": "x"}}]
    chat_error = httpx.post(
        f"{server}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": content}]},
    ).json()["error"]
    assert chat_error["param"].startswith("messages.0.content") and ".str" not in chat_error["param"]


def test_tokenize_renders_messages_as_asked_and_models_retrieve_names_the_model(server, client, generator):
    tokenizer = generator.tokenizer
    messages = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "It is"}]
    url = f"{server}/tokenize"

    def tokens(**options):
        response = httpx.post(url, json={"messages": messages, **options})
        assert response.status_code == 200, response.text
        return response.json()["tokens"]

    def template(**options):
        text = tokenizer.apply_chat_template(messages, tokenize=False, **options)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    assert tokens() == template(add_generation_prompt=True)
    assert tokens(add_generation_prompt=False) == template(add_generation_prompt=False)
    ongoing = tokens(add_generation_prompt=False, continue_final_message=True)
    assert ongoing == template(continue_final_message=True) and tokenizer.decode(ongoing).endswith("It is")
    both = httpx.post(url, json={"messages": messages, "continue_final_message": True}).json()["error"]
    assert both["param"] == "messages" and "cannot both" in both["message"]
    strs = httpx.post(url, json={"prompt": "2 + 2", "return_token_strs": True}).json()
    assert strs["token_strs"] == tokenizer.convert_ids_to_tokens(strs["tokens"])
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-5")


def test_n_samples_per_prompt_follow_the_seed_and_count_the_prompt_once(client):
    messages = chat("Natalia sold clips to 48 of her friends.")
    sampled = {"max_tokens": 8, "temperature": 1.0, "seed": 7}
    many = client.chat.completions.create(model=MODEL, messages=messages, n=3, **sampled)
    assert [c.index for c in many.choices] == [0, 1, 2]
    alone = [
        client.chat.completions.create(model=MODEL, messages=messages, **{**sampled, "seed": 7 + j})
        for j in range(3)
    ]
    assert [c.message.content for c in many.choices] == [a.choices[0].message.content for a in alone]
    assert len({c.message.content for c in many.choices}) > 1, "three seeds should give different samples"
    assert many.usage.prompt_tokens == alone[0].usage.prompt_tokens  # the prompt counts once, as OpenAI's
    assert many.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    cost = many.model_extra["s2t_cost"]  # the cost counts each sample's own pass over the prompt
    assert cost["slm_forward_tokens"] == sum(a.model_extra["s2t_cost"]["slm_forward_tokens"] for a in alone)
    # completions: prompt i's samples are choices i * n ... i * n + n - 1
    texts = ["2 + 2 =", "Janet's ducks"]
    listed = client.completions.create(model=MODEL, prompt=texts, n=2, max_tokens=6, temperature=1.0, seed=3)
    expected = [
        client.completions.create(model=MODEL, prompt=t, max_tokens=6, temperature=1.0, seed=3 + j)
        .choices[0]
        .text
        for t in texts
        for j in range(2)
    ]
    assert [c.index for c in listed.choices] == [0, 1, 2, 3]
    assert [c.text for c in listed.choices] == expected
    streamed = ["", "", "", ""]
    for chunk in client.completions.create(
        model=MODEL, prompt=texts, n=2, max_tokens=6, temperature=1.0, seed=3, stream=True
    ):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == expected
    # echo's pass over a prompt is made once for its n samples, and counted once
    one = client.completions.create(model=MODEL, prompt="2 + 2 =", max_tokens=0, echo=True, logprobs=1)
    two = client.completions.create(model=MODEL, prompt="2 + 2 =", max_tokens=0, echo=True, logprobs=1, n=2)
    assert [c.logprobs.token_logprobs for c in two.choices] == [one.choices[0].logprobs.token_logprobs] * 2
    assert two.model_extra["s2t_cost"]["slm_forward_calls"] == 1
    # the samples' seeds must fit in 64 bits: distinct seeds never wrap onto each other
    top = client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=1.0, seed=2**63 - 1)
    assert len(top.choices) == 1
    with pytest.raises(openai.BadRequestError, match="seed"):
        client.completions.create(
            model=MODEL, prompt="hi", n=2, max_tokens=2, temperature=1.0, seed=2**63 - 1
        )
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", n=129, max_tokens=2)


def test_unknown_fields_are_ignored_and_logged(server, caplog):
    url = f"{server}/v1/completions"
    body = {"model": MODEL, "prompt": "2 + 2 =", "max_tokens": 4}
    plain = httpx.post(url, json=body).json()["choices"]
    with caplog.at_level("WARNING", logger="s2t.serving.app"):
        typo = httpx.post(url, json={**body, "max_token": 64, "vendor_option": {"a": 1}}).json()["choices"]
    assert typo == plain  # nothing changes, as vLLM does
    warnings = [r.getMessage() for r in caplog.records if r.name == "s2t.serving.app"]
    assert warnings == ["request fields ignored (unknown to this server): max_token, vendor_option"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="s2t.serving.app"):
        httpx.post(url, json={**body, "user": "u-1"})  # OpenAI's metadata is known, and ignored quietly
        chat_body = {"model": MODEL, "messages": chat("hi"), "max_tokens": 2, "store": False, "metadata": {}}
        assert httpx.post(f"{server}/v1/chat/completions", json=chat_body).status_code == 200
    assert not [r for r in caplog.records if r.name == "s2t.serving.app"]


def test_null_parameters_take_their_defaults_and_an_empty_body_says_so(server):
    url = f"{server}/v1/completions"
    body = {"model": MODEL, "prompt": "2 + 2 =", "max_tokens": 4}
    plain = httpx.post(url, json=body).json()["choices"]
    nulls = dict.fromkeys(("n", "temperature", "top_p", "stream", "echo", "logprobs", "seed", "stop"))
    assert httpx.post(url, json={**body, **nulls}).json()["choices"] == plain
    chat_body = {"model": MODEL, "messages": chat("hi"), "max_tokens": 2, "logprobs": None, "n": None}
    assert httpx.post(f"{server}/v1/chat/completions", json=chat_body).status_code == 200
    empty = httpx.post(url, headers={"content-type": "application/json"})
    assert empty.status_code == 400 and empty.json()["error"]["message"] == "the request has no JSON body"
    missing = httpx.post(url, json={"model": MODEL, "prompt": None}).json()["error"]
    assert missing["param"] == "prompt", missing  # a required field given as null is still refused
