#!/usr/bin/env bash
# The `mmjax compile` runs behind the fit table and FSDP-scaling figures of docs/tpu.md.
# Each line compiles the full train step of a zoo preset for a TPU topology on this CPU
# host (libtpu) and appends a JSON line to $OUT. Flamingo recipe: ViT and LM frozen
# (no optimizer state), resampler + gated cross-attention trained with AdamW; bf16
# compute, fp32 parameters, per-layer remat; 1 image (224 px) + 512 text tokens per
# example, 2 examples per chip; decoder layers under nn.scan (--scan-layers: one block body
# compiled instead of one per layer, which is what lets Flamingo-80B compile at all; the
# unscanned OpenFlamingo-3B row took 1832 s, see launch/fit_results.jsonl).
# SCAN= (empty) compiles the unrolled decoder instead (the 9b-v5e and 9b-v6e rows of docs/tpu.md).
#   launch/fit_table.sh [ROW ...]     rows: scale-tiny scale-3b 3b-v5e 3b-v5p 3b-v6e 9b-v5e 9b-v5p 9b-v6e 80b-v5e 80b-v5p 80b-v6e
#     and the next smaller slices: 80b-v5e-small 80b-v5p-small 80b-v6e-small; 80b-v5p-16 80b-v5e-small-tp 80b-v5e-4x8
#   the lm family: lm-tiny lm-7b-v5p, and each published-LM preset trained whole on v5p 2x2x1 (LM_ROWS below):
#     llama2-7b-v5p vicuna-7b-v1.5-v5p mpt-1b-redpajama-v5p mpt-7b-v5p redpajama-incite-3b-v5p opt-2.7b-v5p
#     qwen2-7b-v5p mistral-7b-v5p phi-2-v5p stablelm-2-1.6b-v5p persimmon-8b-v5p; lm-presets runs them all
#   the contrastive family, both towers trained whole, bf16 compute: clip-vit-l-14-v5e (softmax loss,
#     77 tokens) siglip-so400m-14-384-v5p (the sigmoid loss chunked round the ring, 64 tokens)
set -uo pipefail
cd "$(dirname "$0")/.."
MMJAX="${MMJAX:-.venv/bin/mmjax}"
OUT="${OUT:-work/fit_table.jsonl}"
mkdir -p "$(dirname "$OUT")"
export JAX_PLATFORMS=cpu TPU_SKIP_MDS_QUERY=1
CFG=configs/flamingo/tiny.py
SCAN="${SCAN---scan-layers}"
RECIPE=(--trainable resampler,xattn --length 512 --num-images 1 --dtype bfloat16 --remat layers
        ${SCAN} --mesh fsdp=-1 --rules fsdp --frozen-rules frozen_towers --json "$OUT")
# An lm preset trained whole (every parameter with Adam state), bf16 compute, per-layer remat,
# scanned layers, 2048 tokens x 2 examples per chip: the lm-7b-v5p row's recipe.
LM_RECIPE=(--length 2048 --dtype bfloat16 --remat layers --scan-layers --json "$OUT")
LM_ROWS=(llama2-7b vicuna-7b-v1.5 mpt-1b-redpajama mpt-7b redpajama-incite-3b opt-2.7b qwen2-7b mistral-7b phi-2
         stablelm-2-1.6b persimmon-8b)

row() {
  case "$1" in
    scale-tiny) "$MMJAX" compile --config $CFG --topology v5e:2x2 --batch 8 --json "$OUT"
                "$MMJAX" compile --config $CFG --topology v5e:4x8 --batch 64 --json "$OUT" ;;
    scale-3b)   "$MMJAX" compile --config $CFG --preset openflamingo-3b --topology v5e:2x2 --batch 8 "${RECIPE[@]}"
                "$MMJAX" compile --config $CFG --preset openflamingo-3b --topology v5e:4x8 --batch 64 "${RECIPE[@]}" ;;
    3b-v5e)  "$MMJAX" compile --config $CFG --preset openflamingo-3b --topology v5e:2x2 --batch 8 "${RECIPE[@]}" ;;
    3b-v5p)  "$MMJAX" compile --config $CFG --preset openflamingo-3b --topology v5p:2x2x1 --batch 8 "${RECIPE[@]}" ;;
    3b-v6e)  "$MMJAX" compile --config $CFG --preset openflamingo-3b --topology v6e:2x2 --batch 8 "${RECIPE[@]}" ;;
    4b-v5e)  "$MMJAX" compile --config $CFG --preset openflamingo-4b --topology v5e:2x2 --batch 8 "${RECIPE[@]}" ;;
    4b-v5p)  "$MMJAX" compile --config $CFG --preset openflamingo-4b --topology v5p:2x2x1 --batch 8 "${RECIPE[@]}" ;;
    9b-v5e)  "$MMJAX" compile --config $CFG --preset openflamingo-9b --topology v5e:2x2 --batch 8 "${RECIPE[@]}" ;;
    9b-v5p)  "$MMJAX" compile --config $CFG --preset openflamingo-9b --topology v5p:2x2x1 --batch 8 "${RECIPE[@]}" ;;
    9b-v6e)  "$MMJAX" compile --config $CFG --preset openflamingo-9b --topology v6e:2x2 --batch 8 "${RECIPE[@]}" ;;
    # The lm family: its tiny config as shipped, and LLaMA-7B trained whole (every parameter
    # with Adam state) at 2048 tokens.
    lm-tiny) "$MMJAX" compile --config configs/lm/tiny.py --topology v5e:2x2 --json "$OUT" ;;
    lm-7b-v5p) "$MMJAX" compile --config configs/lm/tiny.py --preset llama-7b --topology v5p:2x2x1 --batch 8 \
                 --length 2048 --dtype bfloat16 --remat layers --scan-layers --json "$OUT" ;;
    # The LMs the multimodal designs stand on, each at its published size on the smallest v5p slice.
    llama2-7b-v5p|vicuna-7b-v1.5-v5p|mpt-1b-redpajama-v5p|mpt-7b-v5p|redpajama-incite-3b-v5p|opt-2.7b-v5p|\
    qwen2-7b-v5p|mistral-7b-v5p|phi-2-v5p|stablelm-2-1.6b-v5p|persimmon-8b-v5p)
             "$MMJAX" compile --config configs/lm/tiny.py --preset "${1%-v5p}" --topology v5p:2x2x1 --batch 8 \
               "${LM_RECIPE[@]}" ;;
    lm-presets) for p in "${LM_ROWS[@]}"; do row "$p-v5p"; done ;;
    clip-vit-l-14-v5e)
             "$MMJAX" compile --config configs/clip/tiny.py --preset clip-vit-l-14 --topology v5e:2x2 --batch 256 \
               --length 77 --dtype bfloat16 --json "$OUT" ;;
    siglip-so400m-14-384-v5p)
             "$MMJAX" compile --config configs/siglip/tiny.py --preset siglip-so400m-14-384 --topology v5p:2x2x1 \
               --batch 256 --length 64 --dtype bfloat16 --json "$OUT" ;;
    # v5e: every chip holds a whole 7-layer block's gathered weights (about 12G of
    # temporaries whatever the slice), so 80B needs 128 chips for the state to fit beside.
    80b-v5e) "$MMJAX" compile --config $CFG --preset flamingo-80b --topology v5e:8x16 --batch 256 "${RECIPE[@]}" ;;
    80b-v5p) "$MMJAX" compile --config $CFG --preset flamingo-80b --topology v5p:2x2x2 --batch 16 "${RECIPE[@]}" ;;
    80b-v5p-16) "$MMJAX" compile --config $CFG --preset flamingo-80b --topology v5p:2x2x4 --batch 32 "${RECIPE[@]}" ;;
    80b-v6e) "$MMJAX" compile --config $CFG --preset flamingo-80b --topology v6e:4x8 --batch 64 "${RECIPE[@]}" ;;
    # The next smaller slices, compiled to show they do not fit.
    80b-v5e-small) "$MMJAX" compile --config $CFG --preset flamingo-80b --topology v5e:8x8 --batch 128 "${RECIPE[@]}" ;;
    80b-v5e-small-tp) "$MMJAX" compile --config $CFG --preset flamingo-80b --topology v5e:8x8 --batch 128 "${RECIPE[@]}" \
                        --mesh fsdp=-1,tensor=4 --rules fsdp_tensor ;;
    80b-v5e-4x8) "$MMJAX" compile --config $CFG --preset flamingo-80b --topology v5e:4x8 --batch 64 "${RECIPE[@]}" ;;
    80b-v5p-small) "$MMJAX" compile --config $CFG --preset flamingo-80b --topology v5p:2x2x1 --batch 8 "${RECIPE[@]}" ;;
    80b-v6e-small) "$MMJAX" compile --config $CFG --preset flamingo-80b --topology v6e:4x4 --batch 32 "${RECIPE[@]}" ;;
    *) echo "unknown row $1" >&2; return 2 ;;
  esac
}

rows=("$@")
[ ${#rows[@]} -eq 0 ] && rows=(scale-tiny scale-3b 3b-v5e 3b-v5p 3b-v6e 9b-v5p 80b-v5p 80b-v6e 80b-v5e)
for r in "${rows[@]}"; do row "$r"; done
