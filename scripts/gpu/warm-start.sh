#!/bin/bash
# What a new process pays before its first image, by compile scope (run on the GPU machine, results in $OUT): a cold
# process that fills a compile cache, then RUNS warm ones that reuse it, each a new process through the CLI.
#   bash scripts/gpu/warm-start.sh model|blocks [sd15|sdxl] [RUNS]   (sdxl: MLPerf's settings, the VAE in bf16)
set -u
scope=$1 model=${2:-sd15} runs=${3:-1}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o "H[0-9][0-9]*" | head -1 | tr H h)
if [ "$model" = sdxl ]; then
  common=(--mlperf --images 48)
  best="attention=auto compile=true vae_dtype=bf16 compile_scope=$scope"
  out="$OUT/$card-mlperf-sdxl-warm-start-$scope"
else
  common=(--images 160 --batch 32)
  best="attention=auto compile=true channels_last=true compile_scope=$scope"
  out="$OUT/$card-warm-start-$scope"
fi
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,clocks_throttle_reasons.active --format=csv > "$out.csv"
python3 scripts/bench.py "${common[@]}" --rows sdbatch-best,sdbatch-best-warm-start --best "$best" \
  --compile-cache "/tmp/cache-$model-$scope" --out "$out.json" > "$out.log" 2>&1
for run in $(seq 2 "$runs"); do
  python3 scripts/bench.py "${common[@]}" --rows sdbatch-best-warm-start --best "$best" \
    --compile-cache "/tmp/cache-$model-$scope" --out "$out-warm$run.json" >> "$out.log" 2>&1
done
grep -E "^sdbatch-best" "$out.log"
