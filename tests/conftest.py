"""Tiny randomly initialised Qwen2 models and a tiny byte-level BPE tokenizer, built once per session.

No real weights are used in tests: the models share the real pair's architecture family
(Qwen2, tied embeddings, padded vocabulary rows above the tokenizer's size).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from s2t.models import LoadedModel

# Decoding defaults to bfloat16 on hardware that computes in it; tests pin float32 so that their
# numbers do not depend on the machine (tests of the default itself unset this).
os.environ["S2T_DEFAULT_DTYPE"] = "float32"

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast and bakes muffins with four.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "The answer is 42. Natalia sold clips to 48 of her friends in April, and then half as many in May.",
    "How many eggs does she sell? 16 - 3 - 4 = 9, and 9 * 2 = 18 dollars. #### 18",
] * 20
RESERVED_ROWS = 16  # like Qwen: the output embedding has rows above the tokenizer's vocabulary


def make_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(
    tokenizer, seed: int, hidden: int = 32, layers: int = 2, init: float = 0.4
) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer) + RESERVED_ROWS,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        initializer_range=init,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], pad_token_id=tokenizer.pad_token_id
    )
    model.requires_grad_(False)
    return model


def load_script(path: str):
    """A script of this repository outside the package (``bench/``, ``.ci/``) as a module, by its path
    from the repository root."""
    file = Path(__file__).resolve().parents[1] / path
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_eval_config(tmp_path: Path, questions, **options):
    """An :class:`~s2t.evaluate.EvalConfig` over ``questions`` (each answered "4"; prefixed "Test: ", so
    that a selector collected on the same tiny questions is not refused as trained on them), written as a
    tiny test set in ``tmp_path``, for the tiny models with short decoding; ``options`` override any field."""
    from s2t.evaluate import EvalConfig

    test_file = tmp_path / "test.jsonl"
    test_file.write_text(
        "".join(json.dumps({"question": f"Test: {q}", "answer": "#### 4"}) + "\n" for q in questions)
    )
    defaults = dict(
        slm="tiny",
        llm="none",
        dataset="tiny",
        split="test",
        data_file=str(test_file),
        limit=None,
        trigger="entropy",
        k=4,
        max_new_tokens=6,
    )
    return EvalConfig(**(defaults | options))


@functools.cache
def ci_tiny_gguf():
    """``.ci/tiny_gguf.py`` as a module. CI runs that script without the test tree, so the GGUF writer
    both use (``write_gguf``) lives there and the tests import it by path."""
    return load_script(".ci/tiny_gguf.py")


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_pair_dir(tmp_path_factory, tokenizer):
    """Saved tiny SLM and LLM directories (safetensors), loadable by path like real models."""
    root = tmp_path_factory.mktemp("tiny_models")
    paths = {}
    for name, seed, hidden, layers in (("slm", 0, 32, 2), ("llm", 1, 48, 3)):
        model = make_model(tokenizer, seed, hidden, layers)
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


@pytest.fixture(scope="session")
def slm(tiny_pair_dir, tokenizer) -> LoadedModel:
    from s2t.models import load_model

    return load_model(tiny_pair_dir["slm"], device="cpu")


@pytest.fixture(scope="session")
def llm(tiny_pair_dir) -> LoadedModel:
    from s2t.models import load_model

    return load_model(tiny_pair_dir["llm"], device="cpu")


# Tiny GSM-style problems: a local JSONL dataset ("tiny") for evaluation tests.
QUESTIONS = [
    ("How many eggs are left? 16 - 3 - 4", "9"),
    ("What is 2 + 2?", "4"),
    ("Double 21.", "42"),
    ("Half of 48?", "24"),
    ("5 times 3?", "15"),
]


@pytest.fixture()
def data_file(tmp_path) -> str:
    path = tmp_path / "tiny.jsonl"
    path.write_text("\n".join(json.dumps({"question": q, "answer": f"work\n#### {a}"}) for q, a in QUESTIONS))
    return str(path)


@pytest.fixture()
def calibration_data(tmp_path, data_file, monkeypatch):
    """GSM8K 'train' problems to calibrate triggers on (the tiny questions reworded, as another split:
    the same questions would be refused as evaluated ones), and a private cache directory, so that no
    threshold cached by another test is reused."""
    (tmp_path / "data" / "gsm8k").mkdir(parents=True)
    (tmp_path / "data" / "gsm8k" / "train.jsonl").write_text(
        "\n".join(json.dumps({"question": f"Practice: {q}", "answer": f"#### {a}"}) for q, a in QUESTIONS)
    )
    monkeypatch.setenv("S2T_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("S2T_CACHE_DIR", str(tmp_path / "cache"))
