"""Write a tiny random Qwen2 model as a GGUF file and load it through ``s2t.models.load_model``.

    python .ci/tiny_gguf.py WORKDIR

Run by ``.ci/run`` in a fresh virtual environment holding the package *without extras*: loading a
GGUF goes through the same code path as the built-in models (transformers de-quantises it, then it
is saved as safetensors), so a dependency of that path that only an extra installs fails here.
Uses only the base install (torch, transformers, tokenizers, gguf). Takes seconds.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Qwen2Config, Qwen2ForCausalLM

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast.",
    "The answer is \\boxed{18}.",
] * 20


def write_tiny_gguf(path: Path) -> None:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tokenizer.train_from_iterator(CORPUS, trainer)
    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = [
        " ".join(m) if isinstance(m, list) else m for m in json.loads(tokenizer.to_str())["model"]["merges"]
    ]

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False)  # fmt: skip
    model = Qwen2ForCausalLM(config)

    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)  # random weights: any base will do
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIAL else 1 for token in tokens])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_pad_token_id(vocab["<|endoftext|>"])
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise SystemExit(f"no GGUF name for {name}")
        writer.add_tensor(gguf_name, tensor.float().numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


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
    print(f"loaded {path.name} through s2t.models.load_model: {type(loaded.model).__name__}, "
          f"{sum(p.numel() for p in loaded.model.parameters())} parameters, vocabulary {len(loaded.tokenizer)}")  # fmt: skip


if __name__ == "__main__":
    main()
