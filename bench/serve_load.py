"""Load test for `s2t serve`: concurrent OpenAI clients, bounded in requests and in time.

    python bench/serve_load.py --clients 16 --requests 300 --max-tokens 32 --time-limit 300 \
        --out results/bench/serve.json -- --method greedy --max-batch-size 16

Starts `s2t serve` (arguments after `--`) on a free port of 127.0.0.1, waits for /health, sends
streaming chat requests (GSM8K *train* questions) from ``--clients`` concurrent clients until
``--requests`` were sent or ``--time-limit`` seconds passed, stops the server and writes latency
percentiles (whole request and time to first token), throughput and errors. Loopback only; it
stops by itself. Not a test (tests/test_serving.py runs :func:`run_load` against tiny models).

A short request behind a long prompt (chunked prefill, issue 23), once per ``--prefill-chunk``
setting, each on a fresh server:

    python bench/serve_load.py --behind-long-prompt 12000 --prefill-chunks 0,512 --trials 3 \
        --out results/bench/serve_long_prompt.json -- --method greedy --dtype float32

sends a prompt of that many words, then (``--delay`` s later) a short GSM8K question, and records
the short request's latency and time to first token, and the long one's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import AsyncOpenAI


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def streamed_chat(client: AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> dict:
    """One greedy streaming chat request: its text, time to first text and whole latency (s), and the
    finish reason and token counts when the stream gave them."""
    sent = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    result: dict = {}
    pieces, first = [], None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:  # the first text, not the role chunk sent before any token
                first = time.perf_counter() - sent
            pieces.append(chunk.choices[0].delta.content)
        if chunk.choices and chunk.choices[0].finish_reason is not None:
            result["finish_reason"] = chunk.choices[0].finish_reason
        if chunk.usage is not None:  # the last chunk, with no choices
            result.update(
                prompt_tokens=chunk.usage.prompt_tokens, completion_tokens=chunk.usage.completion_tokens
            )
    return result | {"text": "".join(pieces), "ttft_s": first, "latency_s": time.perf_counter() - sent}


async def run_load(
    base_url: str,
    model: str,
    prompts: list[str],
    *,
    clients: int = 16,
    requests: int = 200,
    max_tokens: int = 32,
    time_limit: float = 300.0,
) -> dict:
    """Send up to ``requests`` streaming chat requests from ``clients`` concurrent clients, starting no
    new request after ``time_limit`` seconds; return what was measured (and every answer's text)."""
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=time_limit + 600)
    start = time.perf_counter()
    next_index = 0
    records: list[dict] = []

    async def one_client() -> None:
        nonlocal next_index
        while next_index < requests and time.perf_counter() - start < time_limit:
            index, next_index = next_index, next_index + 1
            record: dict = {"index": index, "prompt": prompts[index % len(prompts)]}
            try:
                record.update(ok=True, **await streamed_chat(client, model, record["prompt"], max_tokens))
            except Exception as error:  # counted, never retried: the load test reports errors
                record.update(ok=False, error=f"{type(error).__name__}: {error}")
            records.append(record)

    await asyncio.gather(*(one_client() for _ in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    ok = [r for r in records if r["ok"]]
    latencies = [r["latency_s"] for r in ok]
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tokens = sum(r.get("completion_tokens", 0) for r in ok)
    return {
        "requests_sent": len(records),
        "answered": len(ok),
        "errors": len(records) - len(ok),
        "error_examples": sorted({r["error"] for r in records if not r["ok"]})[:5],
        "wall_s": round(wall, 2),
        "latency_s": {
            "p50": percentile(latencies, 0.5),
            "p95": percentile(latencies, 0.95),
            "max": max(latencies, default=None),
        },
        "time_to_first_token_s": {"p50": percentile(ttfts, 0.5), "p95": percentile(ttfts, 0.95)},
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 3) if wall else None,
        "requests_per_s": round(len(ok) / wall, 3) if wall else None,
        "records": sorted(records, key=lambda r: r["index"]),
    }


def long_prompt(words: int, questions: list[str]) -> str:
    """A prompt of about ``words`` words: GSM8K questions repeated, then one short instruction."""
    text: list[str] = []
    while len(text) < words:
        for question in questions:
            text.extend(question.split())
    return " ".join(text[:words]) + "\n\nHow many questions are above? Answer with one number."


async def run_behind_long_prompt(
    base_url: str, model: str, long: str | None, short: str, *, delay: float = 1.0, max_tokens: int = 32
) -> dict:
    """Send ``long``, then ``short`` ``delay`` seconds later (both streamed, greedy, ``max_tokens``
    each; ``long=None`` sends ``short`` alone); return each one's latency and time to first token (s)
    and text."""
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=3600)

    async def one(prompt: str, wait: float) -> dict:
        await asyncio.sleep(wait)
        r = await streamed_chat(client, model, prompt, max_tokens)
        return {
            "latency_s": round(r["latency_s"], 3),
            "ttft_s": None if r["ttft_s"] is None else round(r["ttft_s"], 3),
            "prompt_tokens": r.get("prompt_tokens"),
            "completion_tokens": r.get("completion_tokens"),
            "text": r["text"],
        }

    if long is None:
        long_result, short_result = None, await one(short, 0.0)
    else:
        long_result, short_result = await asyncio.gather(one(long, 0.0), one(short, delay))
    await client.close()
    return {"long": long_result, "short": short_result}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        try:
            return httpx.get(f"{url}/health", timeout=5).json()
        except httpx.HTTPError:
            time.sleep(1)
    raise RuntimeError(f"the server was not healthy within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=300.0, help="no new request after this (s)")
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--note", default="", help="stored with the results (e.g. what else ran)")
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--behind-long-prompt",
        type=int,
        default=0,
        metavar="WORDS",
        help="measure one short request sent --delay s after a prompt of WORDS words",
    )
    parser.add_argument("--prefill-chunks", default="0,512", help="--prefill-chunk settings to compare")
    parser.add_argument("--delay", type=float, default=1.0)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("server_args", nargs="*", help="arguments for `s2t serve` (after --)")
    args = parser.parse_args()

    from s2t.data import load_problems

    prompts = [p.question for p in load_problems("gsm8k", "train", limit=64)]
    if args.behind_long_prompt:
        behind_long_prompt(args, prompts)
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = serve_command(port, args.server_args)
    server = subprocess.Popen(command)
    try:
        health = wait_healthy(url, server, args.startup_timeout)
        results = asyncio.run(
            run_load(
                url,
                health["model"],
                prompts,
                clients=args.clients,
                requests=args.requests,
                max_tokens=args.max_tokens,
                time_limit=args.time_limit,
            )
        )
        health_after = httpx.get(f"{url}/health", timeout=5).json()
    finally:
        server.terminate()
        server.wait(60)
    results.pop("records")
    summary = {
        "server_command": ["s2t", *command[3:]],
        "model": health["model"],
        "method": health["method"],
        "clients": args.clients,
        "request_limit": args.requests,
        "time_limit_s": args.time_limit,
        "max_tokens": args.max_tokens,
        "server_counts_after": health_after,
        **results,
        "machine": machine(),
        "note": args.note,
    }
    write_summary(summary, args.out)


def write_summary(summary: dict, out: str | None) -> None:
    """Print the figures and, with ``--out``, write them as JSON."""
    print(json.dumps(summary, indent=2))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(summary, indent=2) + "\n")


def serve_command(port: int, server_args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "s2t.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *server_args,
    ]


def machine() -> str:
    from s2t.models import cpu_description

    return f"{cpu_description()}, torch {__import__('torch').__version__}"


def behind_long_prompt(args: argparse.Namespace, prompts: list[str]) -> None:
    """The chunked-prefill comparison: per ``--prefill-chunk`` setting a fresh server and
    ``--trials`` (long, short) pairs; the median short-request latency is the figure."""
    long = long_prompt(args.behind_long_prompt, prompts)
    settings = []
    for chunk in [int(c) for c in args.prefill_chunks.split(",")]:
        port = free_port()
        command = serve_command(port, [*args.server_args, "--prefill-chunk", str(chunk)])
        server = subprocess.Popen(command)
        try:
            url = f"http://127.0.0.1:{port}"
            health = wait_healthy(url, server, args.startup_timeout)
            alone = asyncio.run(
                run_behind_long_prompt(url, health["model"], None, prompts[1], max_tokens=args.max_tokens)
            )["short"]
            trials = [
                asyncio.run(
                    run_behind_long_prompt(
                        url, health["model"], long, prompts[1], delay=args.delay, max_tokens=args.max_tokens
                    )
                )
                for _ in range(args.trials)
            ]
        finally:
            server.terminate()
            server.wait(60)
        shorts = [t["short"]["latency_s"] for t in trials]
        longs = [t["long"]["latency_s"] for t in trials]
        settings.append(
            {
                "prefill_chunk": chunk,
                "short_alone_latency_s": alone["latency_s"],
                "short_behind_long_latency_s": {"median": percentile(shorts, 0.5), "all": shorts},
                "short_behind_long_ttft_s": [t["short"]["ttft_s"] for t in trials],
                "long_latency_s": {"median": percentile(longs, 0.5), "all": longs},
                "long_prompt_tokens": trials[0]["long"]["prompt_tokens"],
                "same_short_text_as_alone": [t["short"]["text"] == alone["text"] for t in trials],
            }
        )
        print(json.dumps(settings[-1], indent=2), flush=True)
    summary = {
        "server_command": ["s2t", "serve", *args.server_args],
        "long_prompt_words": args.behind_long_prompt,
        "delay_s": args.delay,
        "max_tokens": args.max_tokens,
        "trials": args.trials,
        "settings": settings,
        "machine": machine(),
        "note": args.note,
    }
    write_summary(summary, args.out)


if __name__ == "__main__":
    main()
