"""Local-sufficiency analysis: hit@K at divergence points, one-pass teacher forcing, resumption, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from s2t import analysis
from s2t.analysis import analyze, score_trajectories
from s2t.cli import app
from s2t.cli.analyze import default_out_dir
from s2t.data import Problem
from s2t.engine import ModelStream
from s2t.prompts import build_prompt
from s2t.runs import ConfigMismatchError

QUESTIONS = [
    "Janet's ducks lay 16 eggs per day. She eats three for breakfast.",
    "How many eggs does she sell?",
    "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many?",
]
SOLUTIONS = [
    "16 - 3 - 4 = 9, and 9 * 2 = 18 dollars. #### 18",
    "The answer is 42. #### 42",
    "Natalia sold 48 / 2 = 24 clips in May, 48 + 24 = 72 in all. #### 72",
]
FAST = dict(max_new_tokens=12, progress=False, n_resamples=500)


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return [
        Problem(f"gsm8k/test/{i}", q, s.rsplit("#### ", 1)[1], "gsm8k", "test", solution=s)
        for i, (q, s) in enumerate(zip(QUESTIONS, SOLUTIONS))
    ]


def estimates(summary) -> list[float]:
    return [summary.hit_at_k[k].estimate for k in summary.ks]


def test_hit_at_k_is_monotone_and_reaches_one_at_the_vocabulary_size(slm, llm, problems, tokenizer):
    ks = (1, 2, 4, 8, 16, 64, len(tokenizer))
    summary = analyze(slm, llm, problems, ks=ks, **FAST)
    assert summary.n_divergence_points > 0, "tiny random SLM and LLM should disagree somewhere"
    hits = estimates(summary)
    assert hits == sorted(hits)
    assert hits[-1] == 1.0 and summary.miss.estimate == 0.0
    for k in ks:
        ci = summary.hit_at_k[k]
        assert ci.low <= ci.estimate <= ci.high
    assert sum(t["n_points"] for t in summary.by_position.values()) == summary.n_divergence_points


def test_identical_models_have_no_divergence_points(slm, problems, tmp_path):
    summary = analyze(slm, slm, problems, out_dir=tmp_path, **FAST)
    assert summary.n_positions > 0
    assert summary.n_divergence_points == 0
    assert summary.divergence_share.estimate == 0.0
    assert all(ci is None for ci in summary.hit_at_k.values())
    assert json.loads((tmp_path / "summary.json").read_text())["hit_at_k"][0]["estimate"] is None
    assert (tmp_path / "hitk.png").stat().st_size > 0


def test_one_pass_teacher_forcing_matches_step_by_step_decoding_with_a_kv_cache(slm, llm, tokenizer):
    prompts = [build_prompt(tokenizer, q) for q in QUESTIONS]
    answers = [
        tokenizer(s, add_special_tokens=False)["input_ids"][: 5 + 4 * i] for i, s in enumerate(SOLUTIONS)
    ]
    assert len({len(p) + len(a) for p, a in zip(prompts, answers)}) == 3, "rows should need padding"
    one_pass = score_trajectories(slm, llm, prompts, answers)
    vocab_size = len(tokenizer)
    for prompt, answer, stats in zip(prompts, answers, one_pass):
        assert len(stats) == len(answer)
        streams = {name: ModelStream(m.model, vocab_size) for name, m in (("slm", slm), ("llm", llm))}
        ids = torch.tensor([prompt])
        step_top1 = {"slm": [], "llm": []}
        for token in answer:
            for name, stream in streams.items():
                logits = stream.advance(ids, torch.ones_like(ids))
                step_top1[name].append(int(logits.argmax(-1)))
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert stats.llm_top1 == step_top1["llm"]
        assert stats.slm_top1 == step_top1["slm"]


def test_ranks_count_tokens_with_a_strictly_higher_slm_logit(slm, llm, tokenizer):
    prompt = build_prompt(tokenizer, QUESTIONS[0])
    stats = score_trajectories(slm, llm, [prompt], [[tokenizer.eos_token_id]])[0]
    logits = ModelStream(slm.model, len(tokenizer)).advance(
        torch.tensor([prompt]), torch.ones(1, len(prompt))
    )
    llm_token = stats.llm_top1[0]
    assert stats.rank[0] == 1 + int((logits[0] > logits[0, llm_token]).sum())
    assert (stats.rank[0] == 1) == (stats.slm_top1[0] == llm_token)


def test_resumed_run_reuses_finished_problems_and_matches_an_uninterrupted_run(
    slm, llm, problems, tmp_path, monkeypatch
):
    scored: list[int] = []

    def counting(slm_, llm_, prompts, answers):
        scored.append(len(prompts))
        return score_trajectories(slm_, llm_, prompts, answers)

    monkeypatch.setattr(analysis, "score_trajectories", counting)
    whole = analyze(slm, llm, problems, out_dir=tmp_path / "whole", **FAST)
    assert sum(scored) == 3

    scored.clear()
    analyze(slm, llm, problems[:2], out_dir=tmp_path / "resumed", **FAST)
    resumed = analyze(slm, llm, problems, out_dir=tmp_path / "resumed", **FAST)
    assert scored == [2, 1], "the resumed run must only score the unfinished problem"
    ids = [json.loads(line)["id"] for line in (tmp_path / "resumed" / "problems.jsonl").open()]
    assert ids == [p.id for p in problems]
    assert resumed.to_dict() == whole.to_dict()

    # a problem whose record was lost (killed mid-write) is recomputed, the others are not
    lines = (tmp_path / "whole" / "problems.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "whole" / "problems.jsonl").write_text("".join(lines[:-1]) + lines[-1][:20])
    scored.clear()
    again = analyze(slm, llm, problems, out_dir=tmp_path / "whole", batch_size=1, **FAST)
    assert scored == [1]
    assert len((tmp_path / "whole" / "problems.jsonl").read_text().splitlines()) == 3
    assert again.to_dict()["hit_at_k"] == whole.to_dict()["hit_at_k"]


def test_a_different_configuration_is_refused_in_the_same_directory(slm, llm, problems, tmp_path):
    analyze(slm, llm, problems[:1], out_dir=tmp_path, **FAST)
    with pytest.raises(ConfigMismatchError, match="trajectory"):
        analyze(slm, llm, problems[:1], out_dir=tmp_path, trajectory="reference", **FAST)


def test_reference_trajectory_teacher_forces_the_solution(slm, llm, problems, tmp_path):
    tokenizer = slm.tokenizer  # the tokenizer the analysis uses (loaded from the model directory)
    summary = analyze(slm, llm, problems, trajectory="reference", out_dir=tmp_path, **FAST)
    records = [json.loads(line) for line in (tmp_path / "problems.jsonl").open()]
    for problem, record in zip(problems, records):
        expected = tokenizer(problem.solution, add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        assert record["trajectory"] == expected
        assert record["n_positions"] == len(expected) == len(record["rank"])
    assert summary.n_positions == sum(r["n_positions"] for r in records)
    without = [Problem("x/test/0", "q", "1", "x", "test")]
    with pytest.raises(ValueError, match="needs reference solutions"):
        analyze(slm, llm, without, trajectory="reference", **FAST)


def test_llm_trajectory_is_the_llms_greedy_answer(slm, llm, problems, tmp_path):
    analyze(slm, llm, problems[:2], trajectory="llm", out_dir=tmp_path, **FAST)
    for record in map(json.loads, (tmp_path / "problems.jsonl").open()):
        assert record["trajectory"] == record["llm_top1"]


def test_kl_divergence_points_are_the_positions_above_the_run_quantile(slm, llm, problems, tmp_path):
    summary = analyze(slm, llm, problems, divergence="kl", kl_quantile=0.8, out_dir=tmp_path, **FAST)
    kls = [x for line in (tmp_path / "problems.jsonl").open() for x in json.loads(line)["kl"]]
    assert summary.kl_threshold is not None
    assert summary.n_divergence_points == sum(x > summary.kl_threshold for x in kls)
    assert 0 < summary.divergence_share.estimate <= 0.25
    points = [json.loads(line) for line in (tmp_path / "points.jsonl").open()]
    assert len(points) == summary.n_divergence_points
    assert all(p["kl"] > summary.kl_threshold for p in points)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trajectory": "beam"}, "trajectory must be one of"),
        ({"divergence": "entropy"}, "divergence must be one of"),
        ({"ks": (1, 0)}, "integers >= 1"),
        ({"ks": (1, 10_000)}, "exceeds the vocabulary"),
        ({"kl_quantile": 1.0}, "quantile must lie strictly"),
    ],
)
def test_bad_arguments_are_refused(slm, llm, problems, kwargs, message):
    with pytest.raises(ValueError, match=message):
        analyze(slm, llm, problems, **(FAST | kwargs))


def test_cli_runs_end_to_end_on_a_jsonl_file(tiny_pair_dir, tmp_path):
    data = tmp_path / "problems.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "answer": s}) + "\n" for q, s in zip(QUESTIONS, SOLUTIONS))
    )
    out = tmp_path / "run"
    args = [
        "analyze",
        "--slm",
        tiny_pair_dir["slm"],
        "--llm",
        tiny_pair_dir["llm"],
        "--dataset",
        "gsm8k",
        "--split",
        "test",
        "--limit",
        "2",
        "--offset",
        "1",
        "--data-file",
        str(data),
        "--max-new-tokens",
        "6",
        "--batch-size",
        "2",
        "--ks",
        "1,2,4,8",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "hit@K" in result.stdout and "summary.json" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_problems"] == 2 and summary["config"]["first_problem"] == "gsm8k/test/1"
    assert [e["k"] for e in summary["hit_at_k"]] == [1, 2, 4, 8]
    assert (out / "hitk.png").read_bytes()[:4] == b"\x89PNG"

    bad = CliRunner().invoke(app, args[:-2] + ["--out", str(tmp_path / "bad"), "--trajectory", "beam"])
    assert bad.exit_code == 2
    assert "trajectory must be one of" in bad.output
    past = [*args[:-2], "--out", str(tmp_path / "past")]
    past[past.index("--offset") + 1] = "50"
    result = CliRunner().invoke(app, past)
    assert result.exit_code == 2 and f"no problems selected from {data}" in " ".join(result.output.split())


def test_default_run_directory_names_the_pair_the_data_and_the_mode():
    path = default_out_dir(
        "/tmp/models/slm/", "Qwen/Qwen2.5-32B-Instruct", "gsm8k", "test", 0, 50, "slm", "kl"
    )
    assert str(path) == "runs/analyze-slm-vs-Qwen2.5-32B-Instruct-gsm8k-test-0+50-slm-kl"
