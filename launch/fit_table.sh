#!/usr/bin/env bash
# The `mmjax compile` runs behind the README's fit table and FSDP-scaling figures.
# Each line compiles the full train step of a zoo preset for a TPU topology on this CPU
# host (libtpu) and appends a JSON line to $OUT. Flamingo recipe: ViT and LM frozen
# (no optimizer state), resampler + gated cross-attention trained with AdamW; bf16
# compute, fp32 parameters, per-layer remat; 1 image (224 px) + 512 text tokens per
# example, 2 examples per chip; decoder layers under nn.scan (--scan-layers: one block body
# compiled instead of one per layer, which is what lets Flamingo-80B compile at all; the
# unscanned OpenFlamingo-3B row took 1832 s, see launch/fit_results.jsonl).
#   launch/fit_table.sh [ROW ...]     rows: scale-tiny scale-3b 3b-v5e 3b-v5p 3b-v6e 9b-v5e 9b-v5p 9b-v6e 80b-v5e 80b-v5p 80b-v6e
set -uo pipefail
cd "$(dirname "$0")/.."
MMJAX="${MMJAX:-.venv/bin/mmjax}"
OUT="${OUT:-work/fit_table.jsonl}"
mkdir -p "$(dirname "$OUT")"
export JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1
CFG=configs/flamingo/tiny.py
RECIPE=(--trainable resampler,xattn --length 512 --num-images 1 --dtype bfloat16 --remat layers
        --scan-layers --mesh fsdp=-1 --rules fsdp --frozen-rules frozen_towers --json "$OUT")

row() {
  case "$1" in
    scale-tiny) "$MMJAX" compile --config $CFG --topology v5e:2x2 --batch 8 --json "$OUT"
                "$MMJAX" compile --config $CFG --topology v5e:4x8 --batch 64 --json "$OUT" ;;
    scale-3b)   "$MMJAX" compile --config $CFG --preset openflamingo-3b --topology v5e:2x2 --batch 8 "${RECIPE[@]}"
                "$MMJAX" compile --config $CFG --preset openflamingo-3b --topology v5e:4x8 --batch 64 "${RECIPE[@]}" ;;
    3b-v5e)  "$MMJAX" compile --config $CFG --preset openflamingo-3b --topology v5e:2x2 --batch 8 "${RECIPE[@]}" ;;
    3b-v5p)  "$MMJAX" compile --config $CFG --preset openflamingo-3b --topology v5p:2x2x1 --batch 8 "${RECIPE[@]}" ;;
    3b-v6e)  "$MMJAX" compile --config $CFG --preset openflamingo-3b --topology v6e:2x2 --batch 8 "${RECIPE[@]}" ;;
    9b-v5e)  "$MMJAX" compile --config $CFG --preset openflamingo-9b --topology v5e:2x2 --batch 8 "${RECIPE[@]}" ;;
    9b-v5p)  "$MMJAX" compile --config $CFG --preset openflamingo-9b --topology v5p:2x2x1 --batch 8 "${RECIPE[@]}" ;;
    9b-v6e)  "$MMJAX" compile --config $CFG --preset openflamingo-9b --topology v6e:2x2 --batch 8 "${RECIPE[@]}" ;;
    80b-v5e) "$MMJAX" compile --config $CFG --preset flamingo-80b --topology v5e:8x8 --batch 128 "${RECIPE[@]}" ;;
    80b-v5p) "$MMJAX" compile --config $CFG --preset flamingo-80b --topology v5p:2x2x4 --batch 32 "${RECIPE[@]}" ;;
    80b-v6e) "$MMJAX" compile --config $CFG --preset flamingo-80b --topology v6e:4x8 --batch 64 "${RECIPE[@]}" ;;
    # The next smaller slices, compiled to show they do not fit.
    80b-v5e-small) "$MMJAX" compile --config $CFG --preset flamingo-80b --topology v5e:4x8 --batch 64 "${RECIPE[@]}" ;;
    80b-v5p-small) "$MMJAX" compile --config $CFG --preset flamingo-80b --topology v5p:2x2x2 --batch 16 "${RECIPE[@]}" ;;
    80b-v6e-small) "$MMJAX" compile --config $CFG --preset flamingo-80b --topology v6e:4x4 --batch 32 "${RECIPE[@]}" ;;
    9b-v5e-scan) "$MMJAX" compile --config $CFG --preset openflamingo-9b --topology v5e:2x4 --batch 16 "${RECIPE[@]}" ;;
    *) echo "unknown row $1" >&2; return 2 ;;
  esac
}

rows=("$@")
[ ${#rows[@]} -eq 0 ] && rows=(scale-tiny scale-3b 3b-v5p 3b-v6e 9b-v5p 9b-v6e 9b-v5e 80b-v5p 80b-v6e 80b-v5e)
for r in "${rows[@]}"; do row "$r"; done
