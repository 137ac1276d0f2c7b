#!/usr/bin/env bash
# The S2T-Local verdict on GSM8K test 0-299 (issue 26), from collection to table, in two lanes of one
# core each. Every step resumes, so re-running a lane after an interruption continues where it stopped.
#
#   bash bench/s2t_local_verdict.sh baselines   # greedy, S2T at entropy@0.8 (S2T-Local's ceiling), LLM, maj@8
#   bash bench/s2t_local_verdict.sh s2t-local   # collect 1,000 train problems, train the feature selector, S2T-Local rows
#   bash bench/s2t_local_verdict.sh s2t-local s2t-local/learned  # one S2T-Local row (two lanes run both at once)
#   bash bench/s2t_local_verdict.sh ladder      # the head selector, the ladder and the learning curve (after the collection)
#   bash bench/s2t_local_verdict.sh learned-trigger  # S2T at the hidden-state learned trigger, 100 test problems
#   bash bench/s2t_local_verdict.sh status      # how far each lane has got
#   bash bench/s2t_local_verdict.sh verdict     # the table and the goal's verdict (each lane ends with it)
#
# Run each lane under nohup (`nohup bash bench/s2t_local_verdict.sh baselines > logs/baselines.log 2>&1 &`);
# `ladder` and `learned-trigger` need the whole collection, so they share a core after `baselines`.
# A selector or trigger already trained on the whole collection, and a ladder or curve newer than its
# selectors, is kept: a lane stopped by a session's end resumes where it stopped.
# Both lanes append to one run directory (appends are locked), so the table pairs every method on the
# same problems; `report.md` appears once every method has run through. The commands are the ones
# results/README.md gives for each directory.
set -euo pipefail
cd "$(dirname "$0")/.."
export S2T_DATA_DIR="${S2T_DATA_DIR:-../shared/data}" OMP_NUM_THREADS=1
S2T="${S2T:-.venv/bin/s2t}"
PYTHON="${PYTHON:-.venv/bin/python}"
RUN=results/eval-gsm8k-test-300-llamacpp
COLLECTION=results/collect-gsm8k-train-1000
FEATURES=results/selector-features-gsm8k-train-1000-e08
HEAD=results/selector-head-gsm8k-train-1000-e08
HIDDEN=results/trigger-hidden-gsm8k-train-1000  # the learned trigger with the SLM's hidden state (torch only)
EVAL=(--threads 1 eval --backend llama.cpp --dataset gsm8k --split test --limit 300 --batch-size 16
    --calibration-problems 32 --out "$RUN")

baselines() {
    "$S2T" "${EVAL[@]}" --methods greedy,s2t/entropy@0.8,llm,maj@8
    verdict
}

trained_on_all() {
    # whether the selector (or trigger) directory $1 was trained on the collection's 1,000 problems
    "$PYTHON" -c 'import json, sys
try:
    training = json.load(open(sys.argv[1] + "/selector_config.json"))["training"]
except (OSError, ValueError, KeyError):
    sys.exit(1)
sys.exit(0 if len(training["train_problem_ids"]) + len(training["validation_problem_ids"]) >= 1000 else 1)' "$1"
}

collection_complete() {
    # the collect step of the s2t-local lane fills it; two collectors on one directory would redo each
    # other's problems, so the other lanes only check
    "$PYTHON" -c 'import json, sys; n = len({json.loads(l)["problem_id"] for l in open(sys.argv[1]) if l.strip()})
sys.exit(0 if n >= 1000 else f"the collection holds {n} of 1000 problems: let the s2t-local lane finish it first")' \
        "$COLLECTION/problems.jsonl"
}

s2t_local() {
    # $1, optional: one of the two rows, so that each can run on its own core
    local methods="${1:-s2t-local/entropy@0.8,s2t-local/learned}"
    # 1. the groups: 1,000 train problems; --recompute-features also redoes feature files a new
    #    machine lacks (features/ is not in git) and records that predate the per-position KL. Once
    #    the feature selector is trained on the whole collection, the rows need only its checkpoint,
    #    so a new machine does not spend hours recomputing features nothing will read.
    if ! (collection_complete 2>/dev/null && trained_on_all "$FEATURES"); then
        "$S2T" --threads 1 collect --dataset gsm8k --split train --limit 1000 --batch-size 8 --dtype float32 \
            --recompute-features --out "$COLLECTION"
        # 2. the feature selector at entropy@0.8's points; the run also trains the learned trigger
        #    (kl@0.95), on the logit features, which the llama.cpp backend gives (no hidden states there)
        trained_on_all "$FEATURES" || "$S2T" --threads 1 train --groups "$COLLECTION" --out "$FEATURES" \
            --mode features --overwrite --groups-at entropy@0.8 --k 8 --trigger-rate 0.05 --trigger-features logits
    fi
    # 3. S2T-Local joins the verdict run: at entropy@0.8 and at its learned trigger, no LLM loaded
    "$S2T" "${EVAL[@]}" --selector "$FEATURES" --methods "$methods"
    verdict
}

ladder() {
    collection_complete
    # (--overwrite: a selector trained on part of the collection is trained again)
    trained_on_all "$HEAD" || "$S2T" --threads 1 train --groups "$COLLECTION" --out "$HEAD" --mode head \
        --overwrite --groups-at entropy@0.8 --k 8 --trigger-rate 0
    # the ladder on the feature selector's held-out problems (the s2t-local lane trains it), and the
    # learning curve on the collection's first 100 problems held out
    until trained_on_all "$FEATURES"; do sleep 60; done
    local out=results/bench/selector_ladder-1000-e08.json
    if [[ ! $out -nt $FEATURES/selector_config.json || ! $out -nt $HEAD/selector_config.json ]]; then
        "$PYTHON" bench/selector_agreement.py --groups "$COLLECTION" --selectors "$FEATURES,$HEAD" \
            --validation-from "$FEATURES" --groups-at entropy@0.8 --threads 1 --out "$out"
    fi
    out=results/bench/selector_learning_curve-1000-e08.json
    if [[ ! -e $out ]]; then
        "$PYTHON" bench/selector_agreement.py --groups "$COLLECTION" --hold-out-first 100 \
            --learning-curve 250,500,900 --groups-at entropy@0.8 --threads 1 --out "$out"
    fi
    verdict
}

verdict() {
    # the table and the goal's verdict with its failing link (README's outcome); it says "no verdict
    # yet" until every compared row has finished the 300 problems (each lane ends by running it)
    "$PYTHON" bench/s2t_local_verdict.py --run "$RUN" --ladder results/bench/selector_ladder-1000-e08.json \
        --trigger "$FEATURES" --cost results/s2t-local-cost-gsm8k-train-8-llamacpp-b1 \
        --out results/bench/s2t_local_verdict-300.json
}

learned_trigger() {
    # item 3 of issue 26 once the collection is complete: the learned trigger may read the hidden state
    # (`auto` keeps it where it helps on an inner split of the training problems), so S2T runs on torch,
    # in the float32 table of the 100 test problems, labelled beside the committed s2t/learned row and
    # paired with s2t/kl@0.95 and s2t (entropy@0.95) there
    collection_complete
    trained_on_all "$HIDDEN" || "$S2T" --threads 1 train --groups "$COLLECTION" --out "$HIDDEN" \
        --mode features --overwrite --groups-at entropy@0.8 --k 8 --trigger-rate 0.05 --trigger-features auto
    "$S2T" --threads 1 eval --backend torch --dtype float32 --dataset gsm8k --split test --limit 100 \
        --max-new-tokens 512 --batch-size 16 --selector "$HIDDEN" --methods s2t:hidden/learned \
        --out results/eval-gsm8k-test-100
}

status() {
    "$PYTHON" - "$COLLECTION/problems.jsonl" "$RUN/results.jsonl" "$FEATURES" "$HEAD" "$HIDDEN" <<'EOF'
import collections, json, os, sys

def records(path):  # a torn last line of an interrupted run is skipped
    if os.path.exists(path):
        for line in open(path):
            try:
                yield json.loads(line)
            except ValueError:
                pass

collection, run, *selectors = sys.argv[1:]
latest = {r["problem_id"]: r for r in records(collection)}  # a recomputed record is written again
here = os.path.dirname(collection)
with_files = sum(os.path.exists(os.path.join(here, r["features"])) for r in latest.values())
with_kl = sum("position_kl" in r for r in latest.values())
print(f"collection {here}: {len(latest)} of 1000 problems recorded, {with_kl} with per-position KL, "
      f"{with_files} with their features/ file on this machine")
for selector in selectors:  # trained on how many of the collection's problems
    config = os.path.join(selector, "selector_config.json")
    if os.path.exists(config):
        training = json.load(open(config))["training"]
        n = len(training["train_problem_ids"]) + len(training["validation_problem_ids"])
        print(f"selector {selector}: trained on a collection of {n} problems")
    else:
        print(f"selector {selector}: not trained")
for artefact in ("selector_ladder-1000-e08.json", "selector_learning_curve-1000-e08.json"):
    path = os.path.join("results", "bench", artefact)
    print(f"{path}: {'written' if os.path.exists(path) else 'not yet'}")
done = collections.defaultdict(set)
for r in records(run):
    done[r["method"]].add(r["problem_id"])
print(f"verdict run {os.path.dirname(run)}, problems finished per method (of 300):")
for method, finished in done.items():
    print(f"  {method}: {len(finished)}")
EOF
    local hidden=results/eval-gsm8k-test-100/results.jsonl
    echo "learned-trigger lane: $(grep -c '"method": "s2t:hidden/learned"' "$hidden" 2>/dev/null || true) of 100" \
        "test problems at s2t:hidden/learned in $(dirname "$hidden")"
}

case "${1:-}" in
    baselines) baselines ;;
    s2t-local) s2t_local "${2:-}" ;;
    ladder) ladder ;;
    learned-trigger) learned_trigger ;;
    status) status ;;
    verdict) verdict ;;
    *) echo "usage: bash bench/s2t_local_verdict.sh {baselines|s2t-local [METHOD]|ladder|learned-trigger|status|verdict}" >&2; exit 2 ;;
esac
