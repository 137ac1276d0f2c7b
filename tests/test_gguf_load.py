"""A real (tiny, random) GGUF file loads through s2t.models.load_model: the path the built-in models
take. ``.ci/bare_install`` runs the same script in a fresh environment without extras."""

from __future__ import annotations

import torch

from tests.conftest import ci_tiny_gguf


def test_a_tiny_gguf_file_loads_and_decodes(tmp_path, monkeypatch):
    from s2t.models import load_model

    monkeypatch.setenv("S2T_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny-qwen2.gguf"
    ci_tiny_gguf().write_tiny_gguf(path)
    loaded = load_model(str(path), dtype="float32", device="cpu")
    assert type(loaded.model).__name__ == "Qwen2ForCausalLM"
    assert loaded.tokenizer.decode(loaded.tokenizer("Janet's ducks")["input_ids"]) == "Janet's ducks"
    ids = torch.tensor([loaded.tokenizer("Janet's ducks")["input_ids"]])
    assert loaded.model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
