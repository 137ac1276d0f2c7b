"""What every saved selector and learned trigger shares: a JSON config read safely, and the
fingerprint that pins a checkpoint to the SLM it was trained on."""

from __future__ import annotations

import hashlib
import json
import math
import types
import typing
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import torch
from safetensors.torch import save
from transformers import PreTrainedModel

from s2t.builtin_models import gguf_reader
from s2t.runs import json_text, write_bytes_atomic

WEIGHTS_NAME = "selector.safetensors"  # every selector kind's weights file
CONFIG_NAME = "selector_config.json"  # ... and its JSON config


class SelectorCheckpointError(ValueError):
    """A selector checkpoint is missing, corrupted, or belongs to another base model."""


def read_config(path: Path, config_class):
    """Build the dataclass ``config_class`` from a JSON file; a missing or malformed file (a field
    missing, unknown, of another type, or out of the range the config's ``__post_init__`` checks)
    gets an error naming it."""
    if not Path(path).is_file():
        raise SelectorCheckpointError(f"{path} is missing: re-save the checkpoint with `s2t train`")
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SelectorCheckpointError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise SelectorCheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}")
    known = {f.name: f for f in fields(config_class)}
    missing = [
        n for n, f in known.items() if f.default is MISSING and f.default_factory is MISSING and n not in data
    ]
    unknown = sorted(set(data) - set(known))
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(unknown)}"] if unknown else []
        )
        raise SelectorCheckpointError(
            f"{path} is malformed ({'; '.join(parts)}); re-save it with `s2t train`"
        )
    hints = typing.get_type_hints(config_class)
    wrong = next((n for n, v in data.items() if not _has_type(v, hints[n])), None)
    if wrong is not None:
        raise SelectorCheckpointError(
            f"{path} is malformed ({wrong} = {data[wrong]!r} is not {_type_name(hints[wrong])}); re-save it "
            "with `s2t train`"
        )
    try:
        return config_class(**data)
    except ValueError as e:  # a value out of its range (the config's own checks)
        raise SelectorCheckpointError(f"{path} is malformed ({e}); re-save it with `s2t train`") from e


def _type_name(hint) -> str:
    """A type hint as a reader says it: ``str`` -> "a string", ``float | None`` -> "a number or null"."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object"}
    names |= {list: "a list", type(None): "null"}
    base = typing.get_origin(hint) or hint
    if base is list and typing.get_args(hint):
        return f"a list of {_type_name(typing.get_args(hint)[0]).split(' ', 1)[-1]}s"
    return names.get(base, str(hint))


def _has_type(value, hint) -> bool:
    """Whether a JSON value fits a config field's type hint (``float | None``, ``list[str]``, ...)."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return any(_has_type(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint in (int, float):  # JSON numbers: an int stands for a float, a bool for neither
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    base = typing.get_origin(hint) or hint
    if not isinstance(base, type):
        return True
    if base is list and typing.get_args(hint):  # list[str]: every element too
        return isinstance(value, list) and all(_has_type(v, typing.get_args(hint)[0]) for v in value)
    return isinstance(value, base)


PROBLEM_ID_FIELDS = ("train_problem_ids", "validation_problem_ids")  # a selector's training record


def check_problem_ids(training: dict) -> None:
    """Raise ValueError unless each of a selector training record's problem-id lists (the leakage
    checks read them) is a list of strings."""
    for name in PROBLEM_ID_FIELDS:
        ids = training.get(name, [])
        if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids)):
            raise ValueError(f"training.{name} = {ids!r:.60} is not a list of problem ids")


def check_range(name: str, value, low=None, high=None, *, low_open: bool = False) -> None:
    """Raise ValueError unless ``value`` is finite and ``low <= value <= high`` (``low < value`` with ``low_open``); a
    config's own check of a field, so that a hand-edited checkpoint config is refused by name."""
    if not math.isfinite(value):
        raise ValueError(f"{name} = {value!r} is not a finite number")
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        bounds = (
            f"{'(' if low_open else '['}{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        )
        raise ValueError(f"{name} = {value!r} lies outside {bounds}")


def checkpoint_digest(directory: str | Path, name: str = WEIGHTS_NAME) -> str:
    """A short hash of a saved selector's weights (or another of its files, such as its learned
    trigger's): which trained selector produced a result."""
    return _sha256(Path(directory) / name)[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def non_finite_tensor(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity (None if all are finite)."""
    return next(
        (k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None
    )


def save_checkpoint(directory: Path, weights_name: str, tensors: dict, config_name: str, config) -> None:
    """Write a checkpoint: its tensors with safetensors, then its config (a dataclass with a
    ``weights_sha256`` field), which records the weights file's SHA-256 so that a load can tell a
    damaged file (:func:`check_weights`) even where safetensors still parses it.

    Raises:
        ValueError: a non-finite weight (training diverged); nothing is written.
    """
    bad = non_finite_tensor(tensors)
    if bad is not None:
        raise ValueError(
            f"refusing to save {directory / weights_name}: its {bad!r} weights are not finite (training "
            "diverged: try a lower --lr, or check the collection's features)"
        )
    save_tensors(tensors, directory / weights_name)
    config.weights_sha256 = _sha256(directory / weights_name)
    (directory / config_name).write_text(json_text(asdict(config)))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` as a safetensors file, atomically and with a plain file's permissions
    (safetensors' ``save_file`` makes owner-only files: unreadable to a team on a shared server)."""
    write_bytes_atomic(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def check_weights(
    path: Path, recorded: str | None, what: str = "selector", actual: str | None = None
) -> None:
    """Refuse weights whose SHA-256 (``actual``, default: the file ``path``'s) is not the one their
    config recorded at save time (a checkpoint saved before the hash was recorded, ``recorded=None``,
    is not checked).

    Raises:
        SelectorCheckpointError: naming ``path`` and ``what`` it holds.
    """
    if recorded is not None and (actual or _sha256(path)) != recorded:
        raise SelectorCheckpointError(
            f"corrupted {what} checkpoint: {path} does not match the SHA-256 recorded when it was saved "
            "(the file was damaged or replaced); restore it, or train again with `s2t train`"
        )


def model_fingerprint(model: PreTrainedModel) -> str:
    """A short hash of a model's architecture and a sample of its weights.

    Two loads of the same checkpoint agree in any dtype (the sample is rounded through bfloat16,
    so a model trained on in bfloat16 is recognised in float32); different models do not.
    """
    return _fingerprint(model, torch.bfloat16)


def matches_fingerprint(model: PreTrainedModel, fingerprint: str) -> bool:
    """Whether ``model`` is the base model behind ``fingerprint`` (also in the form older releases wrote)."""
    return fingerprint in (model_fingerprint(model), _fingerprint(model, None))


def check_base_model(
    model: PreTrainedModel | str | Path, base_model: str, fingerprint: str, what: str = "selector"
) -> None:
    """Refuse a checkpoint (a ``what``) trained on another SLM than ``model`` (a transformers model,
    or the path of a GGUF file, compared through :func:`gguf_fingerprint`).

    Raises:
        SelectorCheckpointError: naming the checkpoint's base model and both fingerprints.
    """
    if isinstance(model, str | Path):
        given = gguf_fingerprint(model)
        if given == fingerprint:
            return
    elif matches_fingerprint(model, fingerprint):
        return
    else:
        given = model_fingerprint(model)
    raise SelectorCheckpointError(
        f"this {what} was trained on base model {base_model!r} (fingerprint {fingerprint}); "
        f"the given SLM has fingerprint {given}. Use the same SLM."
    )


def check_builtin_base(base_model: str, slm: str | None, what: str) -> None:
    """Refuse, before any model loads, a checkpoint (``what``) trained on another *built-in* SLM than
    ``slm`` (the run's SLM as named on the command line). Paths and other names are left to
    :func:`check_base_model`'s fingerprint check once the model has loaded.

    Raises:
        SelectorCheckpointError: naming both models.
    """
    from s2t.builtin_models import BUILTIN_MODELS

    if slm is not None and slm != base_model and slm in BUILTIN_MODELS and base_model in BUILTIN_MODELS:
        raise SelectorCheckpointError(
            f"{what} was trained on base model {base_model!r}; this run's SLM is {slm!r}. "
            "Use the same SLM (--slm), or one trained on it"
        )


def _fingerprint(model: PreTrainedModel, round_through: torch.dtype | None) -> str:
    config = model.config
    arch = [type(model).__name__, config.hidden_size, config.num_hidden_layers, config.vocab_size]
    emb = model.get_input_embeddings().weight
    return _digest(arch, emb[: min(64, emb.shape[0]), : min(64, emb.shape[1])].detach(), round_through)


def _digest(arch: list, sample: torch.Tensor, round_through: torch.dtype | None) -> str:
    if round_through is not None:
        sample = sample.to(round_through)
    digest = hashlib.sha256(json.dumps(arch).encode())
    digest.update(torch.round(sample.float().cpu() * 1e3).to(torch.int32).numpy().tobytes())
    return digest.hexdigest()[:16]


def gguf_fingerprint(path: str | Path) -> str:
    """:func:`model_fingerprint` of the model a GGUF file holds, without loading or de-quantising it.

    The transformers model that :func:`s2t.models.load_model` builds from the same file has this
    fingerprint: the architecture's causal-LM class (transformers' own name mapping), the hidden
    size, layer count and vocabulary rows, and the first 64×64 token-embedding values de-quantised
    with the ``gguf`` package.

    Raises:
        SelectorCheckpointError: a file without the fields a model GGUF has.
    """
    from gguf.quants import dequantize
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    reader = gguf_reader(path)

    def field(name):
        f = reader.get_field(name)
        if f is None:
            raise SelectorCheckpointError(f"{path} has no {name}: not a model GGUF file")
        return f.parts[f.data[0]]

    architecture = bytes(field("general.architecture")).decode()
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise SelectorCheckpointError(f"{path} has no token_embd.weight: not a model GGUF file")
    hidden, vocab = (int(n) for n in embedding.shape[:2])
    rows = dequantize(embedding.data[: min(64, vocab)], embedding.tensor_type).reshape(-1, hidden)
    arch = [
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(architecture, architecture),
        hidden,
        int(field(f"{architecture}.block_count")[0]),
        vocab,
    ]
    return _digest(arch, torch.from_numpy(rows[:, :64].copy()), torch.bfloat16)
