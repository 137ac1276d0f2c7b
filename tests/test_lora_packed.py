"""Packed LoRA training: equal to the per-group loss, resumable, and clear about bad collections."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from s2t.policies.learned_selector import LocalSelector
from s2t.training.collect import CollectConfig, Collector
from s2t.training.packing import CollectionFormatError, pack_problem, sparse_kl, sparse_targets
from s2t.training.train import TrainConfig, train
from tests.test_local import _problems

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def groups(tmp_path_factory, slm, llm):
    out = tmp_path_factory.mktemp("packed_groups")
    cfg = CollectConfig(
        slm="tiny-slm",
        llm="tiny-llm",
        dataset="tiny",
        k=4,
        max_new_tokens=16,
        batch_size=2,
        groups_at="entropy@0.5",
    )
    Collector(cfg, out, slm=slm, llm=llm, problems=_problems(), progress=False).run_all()
    return out


def _records(groups):
    return [json.loads(line) for line in (groups / "problems.jsonl").read_text().splitlines()]


def test_packed_problem_gives_each_candidate_its_own_context_and_position(groups):
    record = next(r for r in _records(groups) if len(r["groups"]) >= 2)
    packed = pack_problem(record, k=3, window=4)
    p = len(record["prompt_ids"])
    assert packed.n_groups == len(record["groups"]) and packed.k == 3
    assert packed.base_length == p + max(g["position"] for g in record["groups"])
    for m, g in enumerate(record["groups"]):
        n = p + g["position"]
        for j in range(3):
            row = packed.base_length + m * 3 + j
            assert packed.input_ids[row] == g["candidate_ids"][j]
            assert packed.position_ids[row] == n
            assert packed.allowed[row].nonzero().flatten().tolist() == [*range(n), row]
    # each group's KL window of 4 tokens contributes a total weight of 1
    assert packed.kl_weight.sum().item() == pytest.approx(packed.n_groups)


def test_sparse_kl_is_exact_when_the_targets_hold_the_whole_distribution():
    torch.manual_seed(0)
    frozen, adapted = torch.randn(5, 11), torch.randn(5, 11)
    full = torch.nn.functional.kl_div(
        adapted.log_softmax(-1), frozen.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)
    ids, logprobs = sparse_targets(frozen, 11)
    torch.testing.assert_close(sparse_kl(adapted, ids, logprobs), full, atol=1e-5, rtol=1e-5)
    ids, logprobs = sparse_targets(frozen, 3)  # coarsened: a lower bound, zero when the models agree
    assert (sparse_kl(adapted, ids, logprobs) <= full + 1e-6).all()
    assert sparse_kl(frozen, ids, logprobs).abs().max() < 1e-5


@pytest.mark.parametrize("lora_layers", [None, 1])
def test_packed_loss_and_gradients_equal_one_forward_per_group(groups, slm, lora_layers):
    """One forward per problem (from cached lower-layer states when only the top layer is adapted)
    gives the per-group loop's loss and gradients."""
    from peft import LoraConfig, get_peft_model

    from s2t.training.lora import LORA_TARGETS, first_adapted_layer, frozen_pass, packed_loss, per_group_loss

    cfg = TrainConfig(groups=str(groups), out="unused", mode="lora", prefix_kl_tokens=5, frozen_top=8)
    lm = copy.deepcopy(slm.model)
    vocab = len(slm.tokenizer)
    start = first_adapted_layer(lm.config.num_hidden_layers, lora_layers)
    selector = LocalSelector.initial(lm, "tiny", vocab)
    record = max(_records(groups), key=lambda r: len(r["groups"]))
    packed = pack_problem(record, k=4, window=cfg.prefix_kl_tokens)
    assert packed.n_groups >= 3
    prepared = frozen_pass(lm, packed, vocab, cfg.frozen_top, start)
    assert ("start_hidden" in prepared) == (start > 0)
    torch.manual_seed(1)
    model = get_peft_model(
        lm,
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
            layers_to_transform=list(range(start, lm.config.num_hidden_layers)),
        ),
    )
    with torch.no_grad():  # LoRA's B starts at zero; move it so the adapter changes the model
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    inner = model.base_model.model
    bins = torch.nn.Parameter(torch.randn_like(selector.bins) * 0.5)
    params = [p for p in model.parameters() if p.requires_grad] + [bins]

    def loss_and_grads(fn, *args):
        for p in params:
            p.grad = None
        loss = fn(inner, selector, bins, packed, prepared, cfg, vocab, *args)
        loss = loss[0] if isinstance(loss, tuple) else loss  # packed_loss also returns the scores
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]

    packed_value, packed_grads = loss_and_grads(packed_loss, start)
    group_value, group_grads = loss_and_grads(per_group_loss)
    torch.testing.assert_close(packed_value, group_value, atol=1e-4, rtol=1e-4)
    for a, b in zip(packed_grads, group_grads):
        # float32 in another summation order: with AVX512 kernels (Zen 4) gradients as large as ~90
        # differ by up to 6e-4; a packing fault (a wrong mask or position) is off by far more
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-2)
    # the prefix KL is part of what was compared: it is not zero here
    kl_off = TrainConfig(groups=str(groups), out="unused", mode="lora", prefix_kl_weight=0.0)
    without = packed_loss(inner, selector, bins, packed, prepared, kl_off, vocab, start)[0]
    assert packed_value - without > 1e-3


def test_a_selector_trained_on_a_bfloat16_base_loads_on_the_float32_model_and_not_on_another(slm, tokenizer):
    from s2t.policies.learned_selector import SelectorCheckpointError
    from tests.conftest import make_model

    vocab = len(tokenizer)
    trained_on_bf16 = LocalSelector.initial(copy.deepcopy(slm.model).to(torch.bfloat16), "tiny", vocab)
    trained_on_bf16.check_base(slm.model)  # same checkpoint, other dtype
    with pytest.raises(SelectorCheckpointError, match="fingerprint"):
        trained_on_bf16.check_base(make_model(tokenizer, seed=7))


def _lora_config(groups, out, **overrides):
    base = dict(
        groups=str(groups),
        out=str(out),
        mode="lora",
        epochs=2,
        lr=1e-2,
        batch_size=1,
        val_fraction=0.25,
        lora_r=2,
        lora_dropout=0.0,
        prefix_kl_tokens=4,
        frozen_top=8,
        checkpoint_every=1,
        eval_every=2,
    )
    return TrainConfig(**{**base, **overrides})


def _saved(out):
    from safetensors.torch import load_file

    return {
        **load_file(str(out / "selector.safetensors")),
        **load_file(str(out / "adapter" / "adapter_model.safetensors")),
    }


def test_interrupted_lora_training_resumes_to_the_weights_of_an_uninterrupted_run(
    groups, slm, tmp_path, monkeypatch
):
    from s2t.training.lora import LoraTrainer, ResumeError

    whole = tmp_path / "whole"
    train(_lora_config(groups, whole, lora_layers=1), slm=copy.deepcopy(slm), progress=False)
    history = json.loads((whole / "training_history.json").read_text())
    assert history[0]["where"] == "start" and history[-1]["where"] == "epoch 2"
    assert all("validation" in h for h in history)
    # the saved selector (adapter merged into the SLM) scores held-out groups as training measured them
    from s2t.training.ladder import selector_ladder

    saved = json.loads((whole / "selector_config.json").read_text())["training"]
    ladder = selector_ladder(
        groups, saved["validation_problem_ids"], k=4, selectors=[whole], slm=copy.deepcopy(slm)
    )
    measured, recorded = ladder["rows"][-1], saved["metrics"]["validation"]
    assert measured["n_groups"] == recorded["all"]["n_groups"] > 0
    assert measured["n_divergent"] == recorded["divergent"]["n_groups"] > 0
    assert measured["agreement"]["value"] == pytest.approx(recorded["all"]["agreement_with_llm"])
    assert measured["agreement_divergent"]["value"] == pytest.approx(
        recorded["divergent"]["agreement_with_llm"]
    )

    cut = tmp_path / "cut"
    trainer = LoraTrainer(_lora_config(groups, cut, lora_layers=1), slm=copy.deepcopy(slm), progress=False)
    step, calls = trainer._step, []

    def interrupted(*args):
        if len(calls) == 3:  # the fourth optimiser step is cut off (Ctrl-C, SIGTERM)
            raise KeyboardInterrupt
        calls.append(1)
        return step(*args)

    trainer._step = interrupted
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    saved = json.loads((cut / "checkpoint" / "trainer_state.json").read_text())
    assert saved["step"] == 3  # nothing trained was lost
    with pytest.raises(ResumeError, match="--resume"):
        train(_lora_config(groups, cut, lora_layers=1), slm=copy.deepcopy(slm), progress=False)
    with pytest.raises(ResumeError, match="lr"):
        train(
            _lora_config(groups, cut, lora_layers=1, lr=5e-3),
            slm=copy.deepcopy(slm),
            progress=False,
            resume=True,
        )
    # resumed from a copy of the checkpoint, with the collection's path typed relative to another directory
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(cut, moved)
    monkeypatch.chdir(groups.parent)
    relative = _lora_config(Path(groups.name), moved, lora_layers=1)
    train(relative, slm=copy.deepcopy(slm), progress=False, resume=True)
    a, b = _saved(whole), _saved(moved)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5)
    config = json.loads((moved / "selector_config.json").read_text())["training"]
    assert config["adapted_layers"] == [1]
    assert config["validation_problem_ids"] and config["train_problem_ids"]
    assert not set(config["validation_problem_ids"]) & set(config["train_problem_ids"])


def test_a_collection_that_cannot_be_packed_names_the_command_that_completes_it(groups, slm, tmp_path):
    broken = tmp_path / "old"
    broken.mkdir()
    (broken / "config.json").write_text((groups / "config.json").read_text())
    records = _records(groups)
    for r in records:
        r.pop("trajectory_ids")
    (broken / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(CollectionFormatError, match="trajectory_ids.*s2t collect"):
        train(_lora_config(broken, tmp_path / "a"), slm=copy.deepcopy(slm), progress=False)
    with pytest.raises(CollectionFormatError, match="K=4.*--k"):
        train(_lora_config(groups, tmp_path / "b", k=8), slm=copy.deepcopy(slm), progress=False)
    with pytest.raises(ValueError, match="lora_layers"):
        train(_lora_config(groups, tmp_path / "c", lora_layers=5), slm=copy.deepcopy(slm), progress=False)
