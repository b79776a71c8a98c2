"""The `lm` presets at their published sizes: each preset's parameter count under
``jax.eval_shape`` (nothing allocated) against the figure its source publishes, and each
published-LM preset equal to what the HF importer builds from that model's config.json."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import zoo
from mmjax.convert import hf_gpt_neox, hf_llama, hf_mpt, hf_opt, hf_persimmon, hf_phi, mosaic_gpt
from mmjax.families.lm import model as lm
from mmjax.families.lm import presets as lm_presets

PUBLISHED = {name: figure for name, figure in lm_presets.PUBLISHED_PARAMETERS.items() if figure is not None}


def published_range(figure: str) -> tuple[float, float]:
  """[low, high) of the counts a rounded figure stands for: "1.3B" -> [1.25e9, 1.35e9); "<10B" -> [0, 1e10)."""
  match = re.fullmatch(r"(<?)(\d+(?:\.(\d+))?)B", figure)
  if match is None:
    raise ValueError(f"published figure {figure!r}; expected an int or a string like '7B', '1.3B' or '<10B'")
  value = float(match.group(2)) * 1e9
  if match.group(1):
    return 0.0, value
  half_unit = 0.5 * 10.0 ** -len(match.group(3) or "") * 1e9
  return value - half_unit, value + half_unit


def parameter_count(name: str) -> int:
  shapes = jax.eval_shape(lm.LanguageModel(zoo.get(name)).init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 8), jnp.int32))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def test_a_rounded_figure_stands_for_half_a_unit_of_its_last_digit_either_side():
  assert published_range("1.3B") == pytest.approx((1.25e9, 1.35e9))
  assert published_range("7B") == pytest.approx((6.5e9, 7.5e9))
  assert published_range("<10B") == (0.0, 1e10)
  with pytest.raises(ValueError, match="expected an int or a string"):
    published_range("about 8B")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_lm_presets_have_their_published_parameter_counts(name):
  assert zoo.family_of(name) == "lm"
  count, figure = parameter_count(name), PUBLISHED[name]
  if isinstance(figure, int):
    assert count == figure
  else:
    low, high = published_range(figure)
    assert low <= count < high, f"{name}: {count:,} parameters, published {figure}"


# The fields of each model's published config.json that the importers read (sources in the
# presets' docstring); an importer fed them builds exactly the preset.
_LLAMA2_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, rms_norm_eps=1e-5,
                  max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")
PUBLISHED_CONFIGS = {
    "llama2-7b": (hf_llama.config_from_hf_llama, _LLAMA2_7B),
    "vicuna-7b-v1.5": (hf_llama.config_from_hf_llama, _LLAMA2_7B),
    # MosaicGPT, as published (MPT's April 2023 predecessor, with its width-wide q/k LayerNorm).
    "mpt-1b-redpajama": (mosaic_gpt.config_from_mosaic_gpt, dict(
        architectures=["MosaicGPT"], d_model=2048, n_layers=24, n_heads=16, mlp_ratio=4, vocab_size=50432,
        max_seq_len=2048, alibi=True, alibi_bias_max=8, attn_qk_ln=True, attn_clip_qkv=None, no_bias=True,
        low_precision_layernorm=True)),
    "mpt-7b": (hf_mpt.config_from_hf_mpt, dict(
        d_model=4096, n_layers=32, n_heads=32, expansion_ratio=4, vocab_size=50432, max_seq_len=2048,
        no_bias=True, layer_norm_epsilon=1e-5,
        attn_config=dict(alibi=True, alibi_bias_max=8, qk_ln=False, clip_qkv=None))),
    "redpajama-incite-3b": (hf_gpt_neox.config_from_hf_gpt_neox, dict(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32, vocab_size=50432,
        hidden_act="gelu", layer_norm_eps=1e-5, max_position_embeddings=2048, rotary_emb_base=10000,
        rotary_pct=1.0, use_parallel_residual=False, tie_word_embeddings=False)),
    "opt-2.7b": (hf_opt.config_from_hf_opt, dict(
        hidden_size=2560, ffn_dim=10240, num_hidden_layers=32, num_attention_heads=32, vocab_size=50272,
        activation_function="relu", max_position_embeddings=2048, do_layer_norm_before=True,
        word_embed_proj_dim=2560)),
    "qwen2-7b": (hf_llama.config_from_hf_llama, dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=131072, sliding_window=131072, use_sliding_window=False, max_window_layers=28,
        tie_word_embeddings=False, hidden_act="silu")),
    "mistral-7b": (hf_llama.config_from_hf_llama, dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=32768, sliding_window=4096, tie_word_embeddings=False, hidden_act="silu")),
    "phi-2": (hf_phi.config_from_hf_phi, dict(
        hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=51200, hidden_act="gelu_new", layer_norm_eps=1e-5,
        partial_rotary_factor=0.4, rope_theta=10000.0, max_position_embeddings=2048, qk_layernorm=False)),
    "stablelm-2-1.6b": (hf_llama.config_from_hf_llama, dict(
        model_type="stablelm", hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=100352, layer_norm_eps=1e-5,
        partial_rotary_factor=0.25, rope_theta=10000, max_position_embeddings=4096, use_qkv_bias=True,
        qk_layernorm=False, use_parallel_residual=False, tie_word_embeddings=False, hidden_act="silu")),
    "persimmon-8b": (hf_persimmon.config_from_hf_persimmon, dict(
        hidden_size=4096, intermediate_size=16384, num_hidden_layers=36, num_attention_heads=64,
        num_key_value_heads=64, vocab_size=262144, hidden_act="relu2", layer_norm_eps=1e-5,
        max_position_embeddings=16384, qk_layernorm=True, rope_theta=25000.0, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_a_published_lm_preset_is_what_its_importer_builds_from_the_published_config(name):
  config_from_hf, published_config = PUBLISHED_CONFIGS[name]
  assert zoo.get(name).decoder == config_from_hf(published_config)
