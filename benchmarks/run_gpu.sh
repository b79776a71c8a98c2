#!/usr/bin/env bash
# Everything a lent GPU should measure, in one call of under ten minutes (issue 20, item 3):
#   1. the attention kernels (Pallas) against cuDNN and XLA at `mmjax bench attention`'s
#      shapes (forward and forward+backward, TFLOP/s and share of the bf16 peak);
#   2. the train step (`mmjax bench step`) of a ~1.1B-parameter Flamingo in bfloat16
#      (`--size gpu-1b`: s/step, samples/s, counted and model FLOPs, MFU, memory);
#   3. the train step of the tiny configs (flamingo/tiny, lm/tiny, clip/tiny).
# Each writes OUT/<name>.json and OUT/<name>.md (OUT: the device tool's $OUT, else
# benchmarks/gpu), and the whole output goes to OUT/run_gpu.log; a part that fails or runs
# past its share of the time is logged and the next one still runs.
#
# The device machine reaches no package index and its image lacks some of mmjax's
# dependencies, so first, here (pip works here):
#   make gpu-wheels                      # Python 3.12 wheels of what the image lacks, in .whl/
# then one device call that carries them:
#   run(command="bash benchmarks/run_gpu.sh", carry=[".whl"], timeout_s=600)
# and copy the files that come back into benchmarks/ (benchmarks/gpu/ holds them as they
# came; quote them with the date and device they record).
#
# Dry mode, on any machine (the slow test tier runs it on CPU: tests/test_run_gpu.py): the
# same steps at tiny shapes, kernels in interpret mode, one round each:
#   bash benchmarks/run_gpu.sh --dry
set -uo pipefail
cd "$(dirname "$0")/.."
dry=0
case "${1:-}" in
  --dry) dry=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/run_gpu.sh [--dry]; got ${1@Q}" >&2; exit 2 ;;
esac
out=${OUT:-benchmarks/gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
# The carried wheels, where this Python lacks what they hold (the device image does).
if ! "$py" -c "import ml_collections, grain, tensorflow_datasets" 2> /dev/null && compgen -G ".whl/*.whl" > /dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mmjax-site .whl/*.whl \
    || { echo "run_gpu.sh: installing .whl/ failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/mmjax-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TPU_SKIP_MDS_QUERY=1
data=${MMJAX_DATA_DIR:-/tmp/mmjax-run-gpu-data}
failed=0

part() {  # part SECONDS NAME COMMAND...: runs one part under its time share, logs how it ended
  local limit=$1 name=$2; shift 2
  echo "== $name ($(date -u +%H:%M:%S), at most ${limit}s): $*"
  local began=$SECONDS
  timeout --signal=TERM --kill-after=10 "$limit" "$@"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - began))s"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{
  echo "run_gpu.sh $([ $dry = 1 ] && echo --dry) $(date -u '+%Y-%m-%d %H:%M UTC'); out=$out"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$py" -c "import jax; print('jax', jax.__version__, jax.devices())"
  if [ $dry = 1 ]; then
    part 120 data "$py" -m mmjax data build --data-dir "$data" --size 200
    part 300 attention "$py" -m mmjax bench attention --lengths 128 --cross 64x2x16 --head-dims 64 --causal true \
      --extra-masks --repeats 1 --out "$out/attention"
    part 300 step-flamingo-small "$py" -m mmjax bench step --config configs/flamingo/tiny.py --size issue20-small \
      --rounds 1 --steps 1 --data-dir "$data" --out "$out/step" --append
    part 300 step-lm-tiny "$py" -m mmjax bench step --config configs/lm/tiny.py --rounds 1 --steps 1 \
      --data-dir "$data" --out "$out/step" --append
  else
    part 60 data "$py" -m mmjax data build --data-dir "$data" --size 400
    part 210 attention "$py" -m mmjax bench attention --out "$out/attention"
    part 150 step-gpu-1b "$py" -m mmjax bench step --config configs/flamingo/tiny.py --size gpu-1b \
      --rounds 5 --steps 5 --data-dir "$data" --out "$out/step" --append
    for config in flamingo/tiny lm/tiny clip/tiny; do
      part 45 "step-${config/\//-}" "$py" -m mmjax bench step --config "configs/$config.py" --rounds 5 --steps 10 \
        --data-dir "$data" --out "$out/step" --append
    done
  fi
  echo "run_gpu.sh: done, $failed part(s) failed; files in $out: $(ls "$out" | tr '\n' ' ')"
  [ "$failed" -eq 0 ]
} 2>&1 | tee "$out/run_gpu.log"
exit "${PIPESTATUS[0]}"
