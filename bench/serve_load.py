"""Load test for `s2t serve`: concurrent OpenAI clients, bounded in requests and in time.

    python bench/serve_load.py --clients 16 --requests 300 --max-tokens 32 --time-limit 300 \
        --out results/bench/serve.json -- --method greedy --max-batch-size 16

Starts `s2t serve` (arguments after `--`) on a free port of 127.0.0.1, waits for /health, sends
streaming chat requests (GSM8K *train* questions) from ``--clients`` concurrent clients until
``--requests`` were sent or ``--time-limit`` seconds passed, stops the server and writes latency
percentiles (whole request and time to first token), throughput and errors. Loopback only; it
stops by itself. Not a test (tests/test_serving.py runs :func:`run_load` against tiny models).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
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
            sent = time.perf_counter()
            record: dict = {"index": index, "prompt": prompts[index % len(prompts)]}
            try:
                stream = await client.chat.completions.create(
                    model=model,
                    messages=[{"role": "user", "content": record["prompt"]}],
                    max_tokens=max_tokens,
                    temperature=0.0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                pieces, first = [], None
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        if first is None:  # the first text, not the role chunk sent before any token
                            first = time.perf_counter() - sent
                        pieces.append(chunk.choices[0].delta.content)
                    if chunk.choices and chunk.choices[0].finish_reason is not None:
                        record["finish_reason"] = chunk.choices[0].finish_reason
                    if chunk.usage is not None:  # the last chunk, with no choices
                        record["completion_tokens"] = chunk.usage.completion_tokens
                record.update(
                    ok=True, text="".join(pieces), ttft_s=first, latency_s=time.perf_counter() - sent
                )
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
    parser.add_argument("server_args", nargs="*", help="arguments for `s2t serve` (after --)")
    args = parser.parse_args()

    from s2t.data import load_problems

    prompts = [p.question for p in load_problems("gsm8k", "train", limit=64)]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "s2t.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args.server_args,
    ]
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
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {__import__('torch').__version__}",
        "note": args.note,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
