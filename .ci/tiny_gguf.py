"""Write a tiny random Qwen2 model as a GGUF file and load it through ``s2t.models.load_model``.

    python .ci/tiny_gguf.py WORKDIR

Run by ``.ci/run`` in a fresh virtual environment holding the package *without extras*: loading a
GGUF goes through the same code path as the built-in models (transformers de-quantises it, then it
is saved as safetensors), so a dependency of that path that only an extra installs fails here.
Uses only the base install (torch, transformers, tokenizers, gguf). Takes seconds.

:func:`write_gguf` is also the tests' GGUF writer (``tests/conftest.py`` imports this file by path):
the script runs without the test tree, so the writer lives here.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import gguf
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast.",
    "The answer is \\boxed{18}.",
] * 20


def write_gguf(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    path: str | os.PathLike,
    architecture: str = "qwen2",
) -> str:
    """Write a Qwen2 model and its tokenizer as a float32 GGUF file, as llama.cpp's converter would.

    The tokenizer's vocabulary, merges, special tokens and chat template go in; output-embedding rows
    above the tokenizer's size are named ``[PAD<id>]``, as GGUF converters name them. ``architecture``
    is written as the file's ``general.architecture`` (the tensors keep Qwen2's names). Returns the path.
    """
    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    # transformers keeps the RoPE base in rope_theta, or (newer versions) in rope_parameters
    rope = getattr(config, "rope_theta", None) or (config.rope_parameters or {}).get("rope_theta", 10000.0)
    writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = tokenizer.get_vocab()
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    tokens = [None] * config.vocab_size
    types = [gguf.TokenType.NORMAL] * config.vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        if i in special:
            types[i] = gguf.TokenType.CONTROL
    for i in range(config.vocab_size):
        if tokens[i] is None:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_bos_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, tensor in state.items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"no GGUF name for the tensor {name!r}")
        writer.add_tensor(gguf_name, tensor.float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of 300 tokens, trained on :data:`CORPUS`, with Qwen's special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_tiny_gguf(path: Path) -> None:
    """A tiny random Qwen2 model (untied output embedding) and :func:`tiny_tokenizer`, as a GGUF file."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    write_gguf(Qwen2ForCausalLM(config), tokenizer, path)


def main() -> None:
    work = Path(sys.argv[1])
    work.mkdir(parents=True, exist_ok=True)
    os.environ["S2T_CACHE_DIR"] = str(work / "cache")  # the converted checkpoint goes here
    path = work / "tiny-qwen2.gguf"
    write_tiny_gguf(path)

    import s2t
    import s2t.cli  # noqa: F401  (the CLI's imports must resolve in the base install too)
    from s2t.models import load_model

    print(f"imported s2t from {s2t.__file__}")
    loaded = load_model(str(path), dtype="float32", device="cpu")
    ids = loaded.tokenizer("Janet's ducks", return_tensors="pt")["input_ids"]
    out = loaded.model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4, out.shape
    parameters = sum(p.numel() for p in loaded.model.parameters())
    print(
        f"loaded {path.name} through s2t.models.load_model: {type(loaded.model).__name__}, "
        f"{parameters} parameters, vocabulary {len(loaded.tokenizer)}"
    )


if __name__ == "__main__":
    main()
