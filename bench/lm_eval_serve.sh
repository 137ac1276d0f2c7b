#!/usr/bin/env bash
# lm-evaluation-harness' own API client (`--model local-completions`) against `s2t serve`: lm-eval's
# 5-shot GSM8K task, read from $S2T_DATA_DIR (no Hub), on the first LIMIT test problems, for each method
# asked. One server per method on a free port, stopped after; lm-eval's results and samples go to
# results/lm-eval-serve-gsm8k-test-LIMIT/<method>/.
#
#   bash bench/lm_eval_serve.sh 30 "greedy" "s2t --trigger entropy --threshold 1.17"
#
# Extra words after a method are `s2t serve` options. Backend: `auto` (llama.cpp for the built-in GGUF
# files where llama-cpp-python is installed); SERVE_OPTIONS adds options to every server, LM_EVAL_ARGS to
# every lm_eval run. A batch of 8 answers can take minutes on a CPU: lm-eval's requests wait TIMEOUT
# seconds (default 3600; lm-eval's own default of 300 is too short for S2T on one core).
set -euo pipefail
cd "$(dirname "$0")/.."
export S2T_DATA_DIR="${S2T_DATA_DIR:-../shared/data}" HF_DATASETS_OFFLINE=1
S2T="${S2T:-.venv/bin/s2t}"
LM_EVAL="${LM_EVAL:-.venv/bin/lm_eval}"
PYTHON="${PYTHON:-.venv/bin/python}"
LIMIT="${1:?usage: bash bench/lm_eval_serve.sh LIMIT METHOD [METHOD ...]}"
shift
OUT="results/lm-eval-serve-gsm8k-test-$LIMIT"
TASKS="$(mktemp -d)"
server=""
trap 'rm -rf "$TASKS"; [[ -z $server ]] || kill "$server" 2> /dev/null || true' EXIT
data="$(cd "$S2T_DATA_DIR" && pwd)"
sed "s#DATA_DIR#$data#g" bench/lm_eval_tasks/gsm8k_local.yaml > "$TASKS/gsm8k_local.yaml"
for spec in "$@"; do
    read -r -a words <<< "$spec"
    method="${words[0]}"
    port="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    mkdir -p "$OUT/$method"
    # shellcheck disable=SC2086  # (SERVE_OPTIONS and LM_EVAL_ARGS split into words)
    "$S2T" --threads "${THREADS:-1}" serve --method "${words[@]}" --port "$port" ${SERVE_OPTIONS:-} \
        > "$OUT/$method/serve.log" 2>&1 &
    server=$!
    until curl -sf "http://127.0.0.1:$port/health" > /dev/null; do
        kill -0 "$server" 2> /dev/null || { cat "$OUT/$method/serve.log"; exit 1; }
        sleep 2
    done
    name="$(curl -s "http://127.0.0.1:$port/v1/models" | "$PYTHON" -c 'import json, sys; print(json.load(sys.stdin)["data"][0]["id"])')"
    start=$(date +%s)
    # shellcheck disable=SC2086
    "$LM_EVAL" --model local-completions --tasks gsm8k_local --include_path "$TASKS" --limit "$LIMIT" \
        --batch_size 8 --seed 0 --log_samples --output_path "$OUT/$method" ${LM_EVAL_ARGS:-} \
        --model_args "model=$name,base_url=http://127.0.0.1:$port/v1/completions,num_concurrent=1,max_retries=1,timeout=${TIMEOUT:-3600}" \
        | tee "$OUT/$method/lm_eval.txt"
    echo "wall time: $(( $(date +%s) - start )) s; server: s2t serve --method $spec ${SERVE_OPTIONS:-}" \
        | tee -a "$OUT/$method/lm_eval.txt"
    curl -s "http://127.0.0.1:$port/health" > "$OUT/$method/health.json"
    kill "$server"
    wait "$server" || true
    server=""
done
