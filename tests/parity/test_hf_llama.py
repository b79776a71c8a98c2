"""Parity: a tiny random HF LlamaForCausalLM (GQA, non-default rope theta, tied and untied
embeddings) gives the logits of our Decoder after importing its saved safetensors."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmjax.convert import hf_llama
from mmjax.models.decoder import Decoder

pytestmark = pytest.mark.parity


def _tiny_llama(tie: bool) -> transformers.LlamaForCausalLM:
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
      num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5,
      tie_word_embeddings=tie)
  model = transformers.LlamaForCausalLM(config).eval()
  # RMSNorm scales start at 1: perturb them so the test sees their import.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("layernorm.weight") or name == "model.norm.weight":
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_decoder_logits_equal_hf_llama_after_importing_its_safetensors(tie, tmp_path):
  model = _tiny_llama(tie)
  model.save_pretrained(tmp_path, safe_serialization=True)
  config = hf_llama.config_from_hf_llama(model.config)
  assert (config.num_kv_heads, config.rope_theta, config.tie_embeddings) == (2, 500000.0, tie)
  params = hf_llama.load_llama(tmp_path, config)

  ids = np.random.default_rng(0).integers(0, 97, size=(2, 11)).astype(np.int32)
  with torch.no_grad():
    want = model(torch.from_numpy(ids).long()).logits.numpy()
  got, _ = Decoder(config).apply({"params": params}, jnp.asarray(ids))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
  diff = float(np.max(np.abs(np.asarray(got) - want)))
  print(f"max |logits - hf| = {diff:.2e}")
  assert diff <= 1e-4


def test_missing_unexpected_and_misshaped_keys_are_all_listed_in_one_error():
  model = _tiny_llama(False)
  sd = dict(model.state_dict())
  config = hf_llama.config_from_hf_llama(model.config)
  del sd["model.layers.1.mlp.up_proj.weight"]
  sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(48)
  sd["model.norm.weight"] = torch.ones(47)
  with pytest.raises(ValueError) as err:
    hf_llama.llama_from_state_dict(sd, config)
  message = str(err.value)
  assert "model.layers.1.mlp.up_proj.weight" in message
  assert "model.layers.0.self_attn.q_proj.bias" in message
  assert "model.norm.weight: shape (47,), expected (48,)" in message


def test_qwen2_with_its_qkv_biases_gives_the_hf_logits():
  """Qwen2 is LLaMA with biases on q, k and v (none on o): DecoderConfig.attention_bias."""
  torch.manual_seed(3)
  config = transformers.Qwen2Config(
      vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
      num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
  model = transformers.Qwen2ForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("_proj.bias"):
        p.copy_(0.5 * torch.randn_like(p))  # zero at init: give the test something to import
  ours = hf_llama.config_from_hf_llama(model.config)
  assert (ours.attention_bias, ours.attention_out_bias) == (True, False)
  params = hf_llama.llama_from_state_dict(model.state_dict(), ours)
  ids = np.random.default_rng(4).integers(0, 97, size=(2, 9)).astype(np.int32)
  with torch.no_grad():
    want = model(torch.from_numpy(ids).long()).logits.numpy()
  got, _ = Decoder(ours).apply({"params": params}, jnp.asarray(ids))
  diff = float(np.max(np.abs(np.asarray(got) - want)))
  print(f"max |logits - hf qwen2| = {diff:.2e}")
  assert diff <= 1e-4


@pytest.mark.parametrize("qkv_bias", [False, True], ids=["no-bias", "qkv-bias"])
def test_stablelm_with_layernorms_and_partial_rotary_gives_the_hf_logits(qkv_bias):
  torch.manual_seed(5)
  config = transformers.StableLmConfig(
      vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
      num_key_value_heads=2, max_position_embeddings=64, use_qkv_bias=qkv_bias, tie_word_embeddings=False)
  model = transformers.StableLmForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("_proj.bias"):
        p.add_(0.2 * torch.randn_like(p))
  ours = hf_llama.config_from_hf_llama(model.config)
  assert (ours.norm, ours.rotary_fraction, ours.attention_bias) == ("layer", 0.25, qkv_bias)
  params = hf_llama.llama_from_state_dict(model.state_dict(), ours)
  ids = np.random.default_rng(6).integers(0, 97, size=(2, 9)).astype(np.int32)
  with torch.no_grad():
    want = model(torch.from_numpy(ids).long()).logits.numpy()
  got, _ = Decoder(ours).apply({"params": params}, jnp.asarray(ids))
  diff = float(np.max(np.abs(np.asarray(got) - want)))
  print(f"max |logits - hf stablelm| = {diff:.2e} (qkv_bias={qkv_bias})")
  assert diff <= 1e-4
  with pytest.raises(ValueError, match="qk_layernorm=True"):
    hf_llama.config_from_hf_llama({**model.config.to_dict(), "qk_layernorm": True})
