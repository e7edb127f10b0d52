#!/usr/bin/env bash
# The whole pipeline in GPU mode on SmolLM2-135M-Instruct, for the first GPU machine available:
# GPU pairs, DPO under ZeRO-2 and ZeRO-3 in bf16, GAPO offline and online (ZeRO-3), MOPO, MPO
# weights, eval and scoring on GPU actors, and the server in both mixing modes on GPU.
# Needs a CUDA build of torch (install without -c constraints-cpu.txt) and >= 1 GPU.
#
#   bash bench/gpu_smoke.sh [OUT_DIR]     # ~10-15 min on one GPU; every step must print OK
set -euo pipefail
out=${1:-moray_runs/gpu_smoke}
mkdir -p "$out"
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
[ "$gpus" -ge 1 ] || { echo "no CUDA device visible (torch $(python -c 'import torch; print(torch.__version__)'))"; exit 1; }
workers=$(( gpus >= 2 ? 2 : 1 ))
base=$(python -c "from cluster.base_models import smollm2_dir; print(smollm2_dir())")
step() { echo "== $1"; shift; "$@" > "$out/log_${RANDOM}.txt" 2>&1 && echo "OK" || { echo "FAILED: $*"; exit 1; }; }
gpu=(--gpus-per-actor 1)
train=(--model "$base" --workers "$workers" --use-gpu --epochs 1 --micro-batch-size 4 --grad-accum 1)

python - <<'EOF' > "$out/device_check.txt"
import torch
assert torch.cuda.is_available() and torch.cuda.is_bf16_supported(), "CUDA with bf16 needed"
print("cuda", torch.version.cuda, "devices", torch.cuda.device_count(), torch.cuda.get_device_name(0))
EOF
cat "$out/device_check.txt"
step "pytest: the device and precision tests on CUDA" python -m pytest -q tests/trainers/test_deepspeed_setup.py tests/trainers/core/test_models.py tests/serving/test_engine.py tests/trainers/test_balancing.py
step "pairs on GPU actors (bf16)" moray pairs --model "$base" --prompts demo:64 --objectives sentiment,conciseness \
  --samples-per-prompt 4 --max-new-tokens 32 --out "$out/data" "${gpu[@]}"
for stage in 2 3; do
  step "DPO ZeRO-$stage bf16" moray train dpo --objective sentiment --data "$out/data/pairs_sentiment.jsonl" \
    --zero-stage "$stage" --out "$out/dpo_z$stage" "${train[@]}"
done
step "DPO ZeRO-3 bf16, LoRA + gradient checkpointing" moray train dpo --objective conciseness --lora \
  --data "$out/data/pairs_conciseness.jsonl" --zero-stage 3 --set model.gradient_checkpointing=true \
  --out "$out/dpo_lora" "${train[@]}"
step "GAPO offline ZeRO-2" moray train gapo --objectives sentiment,conciseness --data "$out/data/pairs_multi.jsonl" \
  --zero-stage 2 --out "$out/gapo" "${train[@]}"

step "GAPO online ZeRO-3 (synced generate)" moray train gapo --online --objectives sentiment,conciseness \
  --data demo:16 --samples-per-prompt 2 --max-new-tokens 24 --zero-stage 3 --out "$out/gapo_online" "${train[@]}"
step "MOPO ZeRO-2" moray train mopo --objective conciseness --constraints sentiment=0.5 \
  --data "$out/data/candidates.jsonl" --zero-stage 2 --out "$out/mopo" "${train[@]}"
pol="sentiment=$out/dpo_z2,conciseness=$out/dpo_lora"
step "MPO weights on GPU actors" moray mix mpo --policies "$pol" --ref "$base" --prompts demo:16 \
  --samples-per-prompt 4 --max-new-tokens 24 --out "$out/mpo.json" "${gpu[@]}"
step "eval on GPU actors" moray eval --policies "a=$out/dpo_z2,b=$out/dpo_z3" --prompts demo:16 \
  --objectives sentiment,conciseness --max-new-tokens 24 --out "$out/eval" "${gpu[@]}"
moray serve --policies "$pol" --port 8765 --set num_gpus=1 > "$out/serve.log" 2>&1 &
srv=$!
trap 'kill $srv 2>/dev/null || true' EXIT
for _ in $(seq 120); do curl -sf localhost:8765/v1/objectives > /dev/null && break; sleep 2; done
for mixing in logits soup; do
  step "serve on GPU, $mixing mode" curl -sf localhost:8765/v1/chat/completions -H 'Content-Type: application/json' \
    -d "{\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"max_tokens\":16,\"mixing\":\"$mixing\",\"objective_weights\":{\"sentiment\":0.3,\"conciseness\":0.7}}"
done
echo "all GPU steps passed; logs in $out"
