"""The `blip2` family's presets: BLIP-2, InstructBLIP and MiniGPT-4 at their published sizes,
and two CPU-sized ones.

- ``blip2-tiny``: stage 1 (representation learning): the image tower of ``clip-tiny`` (64 px,
  convolutional stem, width 64, 2 layers: 65 tokens per image with the CLS), a Q-Former of
  width 64, 2 layers (cross-attention in layer 0), 4 heads, MLP 128, 8 queries, all three
  heads ("itc", "itm", "itg") with ITC embeddings of width 64. Its text vocabulary is
  ``lm-tiny``'s 1024 plus [DEC] (id 1024), 64 positions; the task sets the vocabulary and the
  pad / [DEC] ids from the tokenizer in use.
- ``blip2-tiny-stage2``: stage 2 (generative learning): the same tower and Q-Former without
  its text parts (``qformer.text_input=False``: no text embeddings or text feed-forwards, as
  Hugging Face's generation model), no stage-1 heads, and the decoder of ``lm-tiny`` (width
  128, 4 layers, vocabulary 1024). ``image_token_id`` 4 is the tiny sentencepiece
  vocabulary's ``<image>`` (the id ``llava-tiny`` names). So a stage-2 run starts from a
  ``blip2-tiny`` run's tower and Q-Former and an ``lm/tiny`` run's LM.

Published models. The three Hugging Face ones are exactly what ``convert.blip2_config_from_hf``
builds from their config.json (fields it omits take transformers' defaults), so
``convert.blip2_from_hf_directory`` fills them. All share the tower and Q-Former shapes of
BLIP-2 (Li et al. 2023): EVA-CLIP ViT-g/14 (Fang et al. 2023) with its last block dropped, as
BLIP-2 uses it: 39 blocks, width 1408, 16 heads, MLP 6144, GELU, LayerNorm eps 1e-6, no
pre-norm, patch bias, 224 px (257 tokens with the CLS), the ``ln_vision`` LayerNorm on its
tokens (HF's ``post_layernorm``), OpenAI CLIP's pixel mean and std: 985,952,256 parameters as
Hugging Face counts them, the key third of each block's fused ``qkv.bias`` included (LAVIS
trains a query and a value bias only, 54,912 fewer; ``convert``'s docstring). The Q-Former is
BERT-base's shape: 12 layers, width 768, 12 heads, MLP 3072, cross-attention to the tower in
layers 0, 2, ..., 10, 32 queries. The count after each is Hugging Face's, the model built on
torch's meta device from the config.json (tests/families/test_blip2_presets.py); the figure in
brackets is the rounded one the model card's page shows.

- ``blip2-opt-2.7b``: huggingface.co/Salesforce/blip2-opt-2.7b config.json: vision_config and
  qformer_config transformers' defaults (the above; no text input: 105,137,664 Q-Former
  parameters), num_query_tokens 32, text_config OPT-2.7b (hidden 2560, 32 layers, 32 heads,
  ffn 10240) with vocab_size 50304 (OPT's tokenizer plus ``<image>`` = 50265, padded to a
  multiple of 64), image_token_index 50265; 3,744,761,856 parameters [3.74B].
- ``blip2-opt-6.7b``: Salesforce/blip2-opt-6.7b: the same with OPT-6.7b (facebook/opt-6.7b
  config.json: hidden 4096, 32 layers, 32 heads, ffn 16384) and vocab_size 50304;
  7,752,869,376 parameters [7.75B].
- ``instructblip-vicuna-7b``: Salesforce/instructblip-vicuna-7b config.json (Dai et al. 2023):
  the same tower; the Q-Former with text input (its embeddings, 30523 rows: BERT's and [DEC];
  512 positions; text feed-forwards: 185,660,160 parameters) reading the instruction;
  text_config Vicuna-7B v1.1 (LLaMA-7B's shapes: 4096 wide, 32 layers, 32 heads, SwiGLU 11008,
  rms_norm_eps 1e-6, 2048 positions) with vocab_size 32064 (Vicuna's 32000, [PAD], the
  ``<image>`` and ``<video>`` placeholders, padded to a multiple of 64), image_token_index
  32001; 7,913,726,720 parameters [7.91B]. (The vocabulary and placeholder id are those of
  the config.json as transformers' processor update (4.47) rewrote it; transformers'
  conversion script made it with vocab_size 32001.)
- ``minigpt4-vicuna-7b``: MiniGPT-4 (Zhu et al. 2023; github.com/Vision-CAIR/MiniGPT-4,
  minigpt4_vicuna0.yaml): BLIP-2's frozen tower and Q-Former (blip2_pretrained_flant5xxl.pth,
  its text embeddings and text feed-forwards removed: the ``blip2-opt-2.7b`` Q-Former's
  shape), 32 queries, one trained linear projection (768 -> 4096) into Vicuna-7B v0 (LLaMA-7B's
  shapes with vocab_size 32001: LLaMA's 32000 and the [PAD] FastChat's v0 weights add).
  MiniGPT-4 splices the query outputs between prompt chunks and names no placeholder id:
  ``image_token_id`` is 32000, the [PAD] row, which neither LLaMA's tokenizer nor MiniGPT-4
  ever feeds the LM (so another id must pad a generation batch). MiniGPT-4 is not in
  transformers: its count, 7,832,688,128, is the sum of its published parts as transformers
  builds them (BLIP-2's tower 985,952,256 + Q-Former 105,137,664 + queries 24,576 +
  projection 3,149,824 + Vicuna-7B v0 6,738,423,808); with LAVIS's tower (no key bias), the
  checkpoints' own total is 54,912 fewer. A ``Blip2ForConditionalGeneration`` config.json with
  that LLaMA text_config and image_token_index 32000 imports to this preset.

Overrides (``mmjax.zoo.get(name, **overrides)``): the family's ``override`` (any
``Blip2Config`` field, nested configs as dicts of their fields).
"""

from __future__ import annotations

import dataclasses

from mmjax.families.blip2.model import Blip2Config
from mmjax.families.blip2.qformer import QFormerConfig
from mmjax.families.contrastive import presets as contrastive_presets
from mmjax.families.lm import presets as lm_presets
from mmjax.models.vit import ViTConfig

# EVA-CLIP ViT-g/14 as BLIP-2 uses it (module docstring).
EVA_VIT_G = ViTConfig(
    image_size=224, patch_size=14, width=1408, depth=39, num_heads=16, mlp_dim=6144, class_token=True,
    posemb="learned", pre_norm=False, post_norm=True, activation="gelu", patch_bias=True, norm_eps=1e-6)

# BERT-base's shape over the EVA tower; the generation models' Q-Former has no text input.
_QFORMER = QFormerConfig(encoder_width=EVA_VIT_G.width, num_queries=32, vocab_size=30522, text_input=False)
_QFORMER_INSTRUCT = dataclasses.replace(_QFORMER, vocab_size=30523, text_input=True)

_OPT_2_7B = dataclasses.replace(lm_presets.presets()["opt-2.7b"].decoder, vocab_size=50304)
_OPT_6_7B = dataclasses.replace(_OPT_2_7B, width=4096, num_heads=32, num_kv_heads=32, head_dim=128, mlp_dim=16384)
_LLAMA_7B = lm_presets.presets()["llama-7b"].decoder

_TINY_VISION = contrastive_presets.presets()["clip-tiny"].vision
_TINY_DECODER = lm_presets.presets()["lm-tiny"].decoder
_TINY_QFORMER = QFormerConfig(width=64, depth=2, num_heads=4, mlp_dim=128, encoder_width=_TINY_VISION.width,
                              num_queries=8, vocab_size=_TINY_DECODER.vocab_size + 1, max_length=64)

_PRESETS: dict[str, Blip2Config] = {
    "blip2-tiny": Blip2Config(vision=_TINY_VISION, qformer=_TINY_QFORMER, heads=("itc", "itm", "itg"), embed_dim=64,
                              decoder_token_id=_TINY_DECODER.vocab_size, pad_token_id=0, image_token_id=4),
    "blip2-tiny-stage2": Blip2Config(vision=_TINY_VISION, qformer=dataclasses.replace(_TINY_QFORMER, text_input=False),
                                     decoder=_TINY_DECODER, decoder_token_id=_TINY_DECODER.vocab_size, pad_token_id=0,
                                     image_token_id=4),
    "blip2-opt-2.7b": Blip2Config(vision=EVA_VIT_G, qformer=_QFORMER, decoder=_OPT_2_7B, image_token_id=50265),
    "blip2-opt-6.7b": Blip2Config(vision=EVA_VIT_G, qformer=_QFORMER, decoder=_OPT_6_7B, image_token_id=50265),
    "instructblip-vicuna-7b": Blip2Config(vision=EVA_VIT_G, qformer=_QFORMER_INSTRUCT,
                                          decoder=dataclasses.replace(_LLAMA_7B, vocab_size=32064), instruction=True,
                                          image_token_id=32001),
    "minigpt4-vicuna-7b": Blip2Config(vision=EVA_VIT_G, qformer=_QFORMER,
                                      decoder=dataclasses.replace(_LLAMA_7B, vocab_size=32001), image_token_id=32000),
}

# The counts of the module docstring, for the docs' tables; a test checks each against the
# preset's jax.eval_shape count and transformers' meta-device count (MiniGPT-4: of its parts).
PUBLISHED_PARAMETERS: dict[str, int | None] = {
    "blip2-tiny": None,
    "blip2-tiny-stage2": None,
    "blip2-opt-2.7b": 3_744_761_856,
    "blip2-opt-6.7b": 7_752_869_376,
    "instructblip-vicuna-7b": 7_913_726_720,
    "minigpt4-vicuna-7b": 7_832_688_128,
}


def presets() -> dict[str, Blip2Config]:
  """The presets by name."""
  return dict(_PRESETS)
