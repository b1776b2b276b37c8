#!/usr/bin/env bash
# The GPU measurements and checks, most important first, each part under its own time limit so that a short
# session on a GPU machine still brings back what finished. Results, logs and the test report go to OUTDIR.
#
#   bench/gpu_checks.sh OUTDIR [PART ...]
#   parts: env tests speed-1b accum families speed-135m distributed   (default: all, in this order)
#          full-1b, full-135m (the full fine-tuning rows of speed-1b or speed-135m alone), accum-full (the full
#          rows of accum alone), decode (bench/decode_speed.py: dynamic cache against the compiled static cache;
#          MODEL, DATA, CONFIG=examples/gsm8k.yaml, LIMIT=128),
#          dora (the DoRA row of task_results --suite methods; MODEL=model.path, DATA=the datasets' folder)
#          datasets (task_results --suite datasets, one run per dataset under its own limit; MODEL, DATA, SET,
#          NAMES="wnut17 gsm8k alpaca multi30k"; each full-size run takes more than 200 s on an H100, most of it
#          generation: plan a device session of 20 minutes or more for the four)
#
# Then: python bench/train_speed.py --render OUTDIR/<suite>.json   (writes that suite's BENCHMARKS.md section)
set -u
out=${1:?usage: bench/gpu_checks.sh OUTDIR [PART ...]}; shift
parts=${*:-env tests speed-1b accum families speed-135m distributed}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# recompilations and the kernels the compiler could not generate, in each case's log
export TORCH_LOGS=${TORCH_LOGS:-recompiles,perf_hints}
py=${PYTHON:-python3}
TESTS=${TESTS:-}  # a pytest -k expression to run part of the GPU tests
speed() {  # suite, time limit, json name, extra arguments
  local suite=$1 limit=$2 name=$3; shift 3
  timeout "$limit" $py bench/train_speed.py --suite "$suite" --json "$out/$name.json" --logs "$out/logs-$name" \
    --markdown '' "$@" 2>&1 | grep -v '^{' | tail -30
}
for part in $parts; do
  echo "=== $part ($(date -u +%H:%M:%S))"
  case $part in
    env) nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
         $py -c "import torch, transformers, peft; from tailorlm.kernels.attention import _VARLEN_ARGS as a; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'varlen window_size:', 'window_size' in a)" ;;
    tests) env -u TORCH_LOGS timeout 260 $py -m pytest -q -p no:cacheprovider tests/test_kernels_gpu.py -k "$TESTS" \
             --junitxml="$out/gpu-tests.xml" 2>&1 | tail -25 ;;
    speed-1b) speed gpu 360 speed-1b --only llama-3.2-1b ;;
    full-1b) speed gpu 240 full-1b --only llama-3.2-1b --method full ;;
    full-135m) speed gpu 200 full-135m --only smollm2-135m --method full ;;
    decode) env -u TORCH_LOGS timeout 300 $py bench/decode_speed.py --config "${CONFIG:-examples/gsm8k.yaml}" \
              --model "${MODEL:-default}" --data-root "${DATA:-../shared/data}" --limit "${LIMIT:-128}" \
              --json "$out/decode.json" --markdown '' 2>&1 | grep -v 'ETA\|━' | tail -15 ;;
    accum) speed gpu-accum 200 accum ;;
    accum-full) speed gpu-accum 170 accum-full --method full ;;
    dora) timeout 250 $py bench/task_results.py --suite methods --only dora --out "$out/methods" \
            --model "${MODEL:-default}" --data-root "${DATA:-../shared/data}" ${SET:+--set $SET} 2>&1 | tail -15
          grep -h '"error"' "$out/methods/results.json" ;;
    datasets) for name in ${NAMES:-wnut17 gsm8k alpaca multi30k}; do
                echo "--- $name ($(date -u +%H:%M:%S))"
                timeout "${LIMIT:-420}" $py bench/task_results.py --suite datasets --only "$name" --out "$out/datasets-$name" \
                  --model "${MODEL:-default}" --data-root "${DATA:-../shared/data}" --set eval.batch_size=64 \
                  ${SET:+--set $SET} 2>&1 | grep -v 'ETA\|━' | tail -12
                # keep the figures, reports and predictions; drop checkpoints and event files (too many to bring back)
                rm -rf "$out/datasets-$name/$name/checkpoints" "$out/datasets-$name/$name/tensorboard"
              done ;;
    families) speed gpu-families 300 families ;;
    speed-135m) speed gpu 300 speed-135m --only smollm2-135m ;;
    distributed) env -u TORCH_LOGS timeout 150 $py bench/distributed_overhead.py --shape llama-3.2-1b --compile off \
                   --steps 10 --warmup 3 --out "$out/distributed.json" --markdown '' 2>&1 | tail -12 ;;
    *) echo "unknown part: $part" ;;
  esac
done
(cd "$out" && tar czf logs.tgz logs-* 2>/dev/null && rm -rf logs-*)
echo "=== done ($(date -u +%H:%M:%S))"
