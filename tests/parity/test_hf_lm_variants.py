"""Parity (issue 15): tiny random HF MPT (ALiBi, clip_qkv, bias-free LayerNorms), OPT (learned
positions at offset 2, ReLU, biases), Persimmon (qk-norm, partial rotary, squared ReLU), Mistral
(a sliding window shorter than the sequence), LLaMA-3.1 (RoPE frequency scaling), and Qwen2,
StableLM and Phi (also in their own tests; here with a padded batch and cached generation) imported
through their `mmjax.convert` modules give transformers' logits with the decoder's variant
fields, on a batch with a padded example, unrolled and scanned; cached greedy generation equals
transformers' greedy tokens."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmjax.convert import hf_llama, hf_mpt, hf_opt, hf_persimmon, hf_phi
from mmjax.infer import Decoding, Generator
from mmjax.models import scan_layout
from mmjax.models.decoder import Decoder, init_decoder_cache

pytestmark = pytest.mark.parity

VOCAB = 97


def _perturb_norms(model):
  """LayerNorms start at (1, 0): perturb them (and every bias) so the test sees their import."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias") or "ln" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def _mpt():
  torch.manual_seed(3)
  config = transformers.MptConfig(
      vocab_size=VOCAB, d_model=48, n_heads=6, n_layers=3, max_seq_len=64,
      attn_config={"alibi": True, "alibi_bias_max": 8, "clip_qkv": 0.2}, attn_implementation="eager")
  return _perturb_norms(transformers.MptForCausalLM(config).eval())


def _mpt_odd_heads():
  # 5 heads: ALiBi's slopes for a head count that is not a power of two; no clip.
  torch.manual_seed(4)
  config = transformers.MptConfig(vocab_size=VOCAB, d_model=40, n_heads=5, n_layers=2, max_seq_len=64,
                                  attn_config={"alibi": True}, attn_implementation="eager")
  return _perturb_norms(transformers.MptForCausalLM(config).eval())


def _opt():
  torch.manual_seed(5)
  config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=3, ffn_dim=96,
                                  num_attention_heads=6, max_position_embeddings=64, pad_token_id=1,
                                  attn_implementation="eager")
  return _perturb_norms(transformers.OPTForCausalLM(config).eval())


def _persimmon():
  torch.manual_seed(6)
  config = transformers.PersimmonConfig(
      vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
      max_position_embeddings=64, qk_layernorm=True, attn_implementation="eager",
      rope_parameters={"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5})
  return _perturb_norms(transformers.PersimmonForCausalLM(config).eval())


def _mistral():
  torch.manual_seed(7)
  config = transformers.MistralConfig(
      vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
      num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4, attn_implementation="eager")
  return _perturb_norms(transformers.MistralForCausalLM(config).eval())


def _llama3():
  torch.manual_seed(8)
  # original_max_position_embeddings small enough that the tiny head's wavelengths fall in all
  # three bands (scaled, interpolated, kept) of the rule.
  config = transformers.LlamaConfig(
      vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
      rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
  return _perturb_norms(transformers.LlamaForCausalLM(config).eval())


def _qwen2():
  torch.manual_seed(9)
  config = transformers.Qwen2Config(
      vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, attn_implementation="eager")
  return _perturb_norms(transformers.Qwen2ForCausalLM(config).eval())


def _stablelm():
  torch.manual_seed(10)
  config = transformers.StableLmConfig(
      vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
      num_key_value_heads=2, max_position_embeddings=64, use_qkv_bias=True, attn_implementation="eager",
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
  return _perturb_norms(transformers.StableLmForCausalLM(config).eval())


def _phi():
  torch.manual_seed(11)
  config = transformers.PhiConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                  num_attention_heads=6, max_position_embeddings=64, attn_implementation="eager")
  return _perturb_norms(transformers.PhiForCausalLM(config).eval())


ARCHS = {
    "mpt": (_mpt, hf_mpt.config_from_hf_mpt, hf_mpt.mpt_from_state_dict),
    "mpt-5-heads": (_mpt_odd_heads, hf_mpt.config_from_hf_mpt, hf_mpt.mpt_from_state_dict),
    "opt": (_opt, hf_opt.config_from_hf_opt, hf_opt.opt_from_state_dict),
    "persimmon": (_persimmon, hf_persimmon.config_from_hf_persimmon, hf_persimmon.persimmon_from_state_dict),
    "mistral": (_mistral, hf_llama.config_from_hf_llama, hf_llama.llama_from_state_dict),
    "llama3": (_llama3, hf_llama.config_from_hf_llama, hf_llama.llama_from_state_dict),
    "qwen2": (_qwen2, hf_llama.config_from_hf_llama, hf_llama.llama_from_state_dict),
    "stablelm": (_stablelm, hf_llama.config_from_hf_llama, hf_llama.llama_from_state_dict),
    "phi": (_phi, hf_phi.config_from_hf_phi, lambda sd, config: hf_phi.phi_from_state_dict(sd, config)),
}

# What each import must have set (the variant under test).
EXPECTED = {
    "mpt": dict(positions="alibi", clip_qkv=0.2, norm_bias=False, mlp="gelu", tie_embeddings=True),
    "mpt-5-heads": dict(positions="alibi", num_heads=5),
    "opt": dict(positions="learned", position_offset=2, mlp="relu", mlp_bias=True, attention_bias=True),
    "persimmon": dict(qk_norm="head", rotary_fraction=0.5, mlp="relu2", rope_theta=25000.0),
    "mistral": dict(sliding_window=4, num_kv_heads=2),
    "llama3": dict(rope_scaling="llama3", rope_original_max_length=32),
    "qwen2": dict(attention_bias=True, attention_out_bias=False, num_kv_heads=2),
    "stablelm": dict(norm="layer", rotary_fraction=0.25, attention_bias=True),
    "phi": dict(parallel_residual=True, parallel_norms=1, lm_head_bias=True, rotary_fraction=0.5),
}


def _imported(name: str, scan: bool = False):
  build, read_config, convert = ARCHS[name]
  model = build()
  config = read_config(model.config, scan_layers=scan)
  for field, value in EXPECTED[name].items():
    assert getattr(config, field) == pytest.approx(value) if isinstance(value, float) else getattr(config, field) == value, field
  params = convert(model.state_dict(), config)
  if scan:
    params = scan_layout.stack_layers(params, config.depth)
  return model, config, params


@pytest.mark.parametrize("name, scan", [(n, False) for n in ARCHS] + [("mpt", True), ("opt", True),
                                                                        ("mistral", True)])
def test_decoder_logits_equal_transformers(name, scan):
  model, config, params = _imported(name, scan)
  ids = np.random.default_rng(0).integers(2, VOCAB, size=(2, 11)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0  # a padded example: its real tokens' logits must not see the padding (causal)
  with torch.no_grad():
    want = model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits.numpy()
  got, _ = Decoder(config).apply({"params": params}, jnp.asarray(ids))
  got = np.asarray(got)
  diff = max(float(np.max(np.abs(got[0] - want[0]))), float(np.max(np.abs(got[1, :7] - want[1, :7]))))
  print(f"{name}: max |logits - transformers| = {diff:.2e} (scan={scan})")
  assert diff <= 1e-4


# ALiBi's and the window's caches in the default tier; the others (RoPE variants the decoder
# caches alike, learned positions) in the slow tier.
@pytest.mark.parametrize("name", ["mpt", "mistral"] + [pytest.param(n, marks=pytest.mark.slow) for n in (
    "opt", "persimmon", "llama3", "qwen2", "stablelm", "phi")])
def test_cached_generation_gives_transformers_greedy_tokens(name):
  model, config, params = _imported(name)
  decoder = Decoder(config)

  def prefill(p, inputs, ids, positions, lengths, cache):
    logits, cache = decoder.apply(p, ids, positions=positions, cache=cache)
    return logits, cache, ()

  decoding = Decoding(max_length=64, init_cache=lambda b, s: init_decoder_cache(config, b, s), prefill=prefill,
                      step=lambda p, tok, pos, ctx, cache: decoder.apply(p, tok, positions=pos, cache=cache))
  prompt = np.random.default_rng(1).integers(2, VOCAB, size=(1, 6)).astype(np.int32)
  # No end-of-sequence id: with one, min_new_tokens would make transformers suppress it (Phi's
  # config names 2, which its greedy continuation picks), and the comparison is of plain greedy.
  model.generation_config.eos_token_id = None
  with torch.no_grad():
    want = model.generate(torch.from_numpy(prompt).long(), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                          pad_token_id=0).numpy()[0, 6:]
  got = Generator(decoding).generate({"params": params}, None, prompt, 10)
  assert got.tokens[0].tolist() == want.tolist()


def test_a_config_the_decoder_does_not_support_is_refused_by_name():
  _, config, params = _imported("mpt")
  with pytest.raises(ValueError, match="positions='alibi' with rotary_fraction=0.5"):
    Decoder(dataclasses.replace(config, rotary_fraction=0.5)).init(
        __import__("jax").random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))
  hf = _mpt().config.to_dict()
  hf["attn_config"]["qk_ln"] = True
  with pytest.raises(ValueError, match="attn_config.qk_ln"):
    hf_mpt.config_from_hf_mpt(hf)
  opt = _opt().config.to_dict()
  opt["do_layer_norm_before"] = False
  with pytest.raises(ValueError, match="do_layer_norm_before"):
    hf_opt.config_from_hf_opt(opt)


@pytest.mark.parametrize("name", ["mpt", "opt", "persimmon"])
def test_a_state_dict_that_disagrees_with_its_config_lists_every_bad_key(name):
  model, config, _ = _imported(name)
  sd = dict(model.state_dict())
  first = sorted(k for k in sd if ".0." in k and k.endswith("weight"))[0]
  dropped = sorted(k for k in sd if ".1." in k)[0]
  del sd[dropped]
  sd[first] = torch.zeros(3, 5)
  sd["extra.weight"] = torch.zeros(2)
  with pytest.raises(ValueError) as err:
    ARCHS[name][2](sd, config)
  for key in (dropped, f"{first}: shape (3, 5)", "extra.weight"):
    assert key in str(err.value)
