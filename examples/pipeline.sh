#!/usr/bin/env bash
# The whole optimizer pipeline on real data, offline: critic data construction -> SFT -> evaluation.
#
#   examples/pipeline.sh [DATA_DIR] [WORK_DIR]
#
# DATA_DIR holds the BPO release files (default ../shared/data/bpo): pairs.json (300 preference records
# with the authors' critic answers), vicuna_eval.jsonl, dolly_eval.json, self_instruct_eval.json.
# The critic, target and judge are fakes on loopback (examples/fake_models.py), the base model is the
# tiny random Llama of the tests, so the figures show the plumbing on real inputs, not model quality.
# Knobs (environment): PORT (9011), STEPS (300), LIMIT (prompts per eval set, 40), PYTHON (.venv/bin/python).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DATA="$(cd "${1:-$ROOT/../shared/data/bpo}" && pwd)"
WORK="${2:-$ROOT/runs/pipeline}"
PORT="${PORT:-9011}"
STEPS="${STEPS:-300}"
LIMIT="${LIMIT:-40}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
BASE_URL="http://127.0.0.1:$PORT/v1"
export LITELLM_LOCAL_MODEL_COST_MAP=True PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
bpo() { "$PYTHON" -m proxy.cli "$@"; }

cd "$ROOT"
mkdir -p "$WORK"
"$PYTHON" -m examples.fake_models --port "$PORT" --replay "$DATA/pairs.json" &
FAKE_PID=$!
trap 'kill "$FAKE_PID" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  curl -sf "$BASE_URL/models" >/dev/null && break
  sleep 0.1
done

echo "== 1. data build: the authors' 300 preference records through our critic prompt, parser and filters"
bpo data build --input "$DATA/pairs.json" --output "$WORK/pairs.jsonl" \
  --critic-model fake-critic --critic-base-url "$BASE_URL" --no-progress

echo "== 2. train: the tiny random Llama on the pairs (10% held out)"
[ -d "$WORK/base" ] || "$PYTHON" -m tests.fakes.tiny_model "$WORK/base" >/dev/null
bpo train --base "$WORK/base" --data "$WORK/pairs.jsonl" --output "$WORK/model" --name bpo-pipeline-tiny \
  --max-steps "$STEPS" --learning-rate 3e-3 --batch-size 8 --max-length 512 \
  --eval-fraction 0.1 --eval-generate 16 --logging-steps 50

echo "== 3. eval: Vicuna / Dolly / Self-Instruct files as they are, both judge orders, $LIMIT prompts each"
bpo eval --prompts "$DATA/vicuna_eval.jsonl" --prompts "$DATA/dolly_eval.json" \
  --prompts "$DATA/self_instruct_eval.json" --limit "$LIMIT" \
  --optimizer "hf:$WORK/model" --context append --max-new-tokens 96 --seed 0 \
  --target-model fake-model --target-base-url "$BASE_URL" \
  --judge-model fake-judge --judge-base-url "$BASE_URL" \
  --output "$WORK/eval/results.jsonl" --plot "$WORK/eval/win_tie_loss.png" --no-progress

echo "== 4. data iterate: the trained optimizer rewrites 8 Vicuna prompts, then its own rewrites again"
bpo data iterate --input "$DATA/vicuna_eval.jsonl" --limit 8 --rounds 2 --optimizer "hf:$WORK/model" \
  --max-new-tokens 96 --seed 0 --output "$WORK/iterated.jsonl" --no-progress

echo "== outputs in $WORK: pairs.jsonl (+ .rejected.jsonl, .run.json), model/ (bpo_manifest.json), eval/, iterated.jsonl"
