"""`make demo`'s first run on each backend: wall time and peak memory from an empty model cache.

    S2T_DATA_DIR=../shared/data python bench/first_run.py --out results/bench/first_run.json

For each ``--backends`` entry, ``s2t generate --problem gsm8k/test/0 --method greedy,s2t --backend B``
(``make demo``'s command) runs in a child process whose ``$S2T_CACHE_DIR`` is a fresh directory
holding only the built-in pair's joined GGUF files, hard-linked from the current cache. So each run
prepares what its backend needs (torch: de-quantise both GGUF files to float32 safetensors; llama.cpp:
nothing) and calibrates S2T's threshold, as a first run does; the PyPI download of the GGUF parts,
the same for both, is left out. Peak memory is the child's maximum resident set size
(GNU time's ``%M``). Real models; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from s2t.builtin_models import BUILTIN_MODELS, builtin_gguf, cache_root
from s2t.models import DEFAULT_LLM, DEFAULT_SLM, cpu_description

COMMAND = ["generate", "--problem", "gsm8k/test/0", "--method", "greedy,s2t", "--json"]


def _s2t_script() -> str:
    """The ``s2t`` entry point beside this Python (its virtual environment), else on ``$PATH``."""
    beside = Path(sys.executable).parent / "s2t"
    found = str(beside) if beside.is_file() else shutil.which("s2t")
    if found is None:
        raise SystemExit("no `s2t` command: install the package (pip install -e .) first")
    return found


def first_run(backend: str, threads: int | None) -> dict:
    """One fresh-cache run of the demo command on ``backend``: seconds, peak RSS (GiB) and its answers."""
    with tempfile.TemporaryDirectory(prefix="s2t-first-run-", dir=cache_root().parent) as tmp:
        (Path(tmp) / "gguf").mkdir()
        for name in (DEFAULT_SLM, DEFAULT_LLM):
            source = builtin_gguf(name)
            if not source.is_file():
                raise SystemExit(f"{source} is missing: run `s2t prepare {name}` once first")
            os.link(source, Path(tmp) / "gguf" / source.name)
        env = os.environ | {"S2T_CACHE_DIR": tmp}
        cmd = [_s2t_script(), *(["--threads", str(threads)] if threads else []), *COMMAND]
        peak_file = Path(tmp) / "peak_kib"
        timed = ["/usr/bin/time", "-f", "%M", "-o", str(peak_file), *cmd, "--backend", backend]
        start = time.perf_counter()
        done = subprocess.run(timed, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} --backend {backend} failed:\n{done.stderr[-2000:]}")
        peak_gib = int(peak_file.read_text().split()[-1]) / 2**20
    entries = json.loads(done.stdout)
    return {
        "backend": backend,
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(peak_gib, 2),
        "answers": {name: e["answer"] for name, e in entries.items()},
        "correct": {name: e.get("correct") for name, e in entries.items()},
        "engine": sorted({e["engine"] for e in entries.values()}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="llama.cpp,torch")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    missing = [m for m in (DEFAULT_SLM, DEFAULT_LLM) if m not in BUILTIN_MODELS]
    if missing:
        raise SystemExit(f"not built-in models: {missing}")
    rows = []
    for backend in args.backends.split(","):
        rows.append(first_run(backend, args.threads))
        print(json.dumps(rows[-1]), file=sys.stderr)
    report = {"cpu": cpu_description(), "command": "s2t " + " ".join(COMMAND), "rows": rows}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
