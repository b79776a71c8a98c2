"""Parity (issue 15, first architecture): a tiny random HF GPTNeoXForCausalLM (partial rotary,
parallel and sequential residual, biases, LayerNorm, GELU) imported through
`mmjax.convert.hf_gpt_neox` gives its logits with the decoder's variant fields, unrolled and
scanned, a padded batch included; cached greedy generation equals the full forward."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmjax.convert import hf_gpt_neox
from mmjax.infer import Decoding, Generator
from mmjax.models import scan_layout
from mmjax.models.decoder import Decoder, init_decoder_cache

pytestmark = pytest.mark.parity


def _tiny_neox(parallel: bool, rotary: float = 0.25) -> transformers.GPTNeoXForCausalLM:
  torch.manual_seed(2)
  config = transformers.GPTNeoXConfig(
      vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=6, intermediate_size=96,
      max_position_embeddings=64, use_parallel_residual=parallel, tie_word_embeddings=False,
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": rotary})
  model = transformers.GPTNeoXForCausalLM(config).eval()
  with torch.no_grad():  # LayerNorms start at (1, 0): perturb them so the test sees their import
    for name, p in model.named_parameters():
      if "layernorm" in name or "layer_norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.mark.parametrize("parallel, scan", [(True, False), (False, False), (True, True)],
                         ids=["parallel", "sequential", "parallel-scanned"])
def test_decoder_logits_equal_hf_gpt_neox(parallel, scan):
  model = _tiny_neox(parallel)
  config = hf_gpt_neox.config_from_hf_gpt_neox(model.config, scan_layers=scan)
  assert (config.rotary_fraction, config.parallel_residual, config.norm) == (0.25, parallel, "layer")
  params = hf_gpt_neox.gpt_neox_from_state_dict(model.state_dict(), config)
  if scan:
    params = scan_layout.stack_layers(params, config.depth)
  ids = np.random.default_rng(0).integers(0, 97, size=(2, 11)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0  # a padded example: its real tokens' logits must not see the padding (causal)
  with torch.no_grad():
    want = model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits.numpy()
  got, _ = Decoder(config).apply({"params": params}, jnp.asarray(ids))
  got = np.asarray(got)
  diff = max(float(np.max(np.abs(got[0] - want[0]))), float(np.max(np.abs(got[1, :7] - want[1, :7]))))
  print(f"max |logits - hf| = {diff:.2e} (parallel={parallel}, scan={scan})")
  assert diff <= 1e-4


def test_cached_gpt_neox_generation_gives_hf_greedy_tokens():
  model = _tiny_neox(True)
  config = hf_gpt_neox.config_from_hf_gpt_neox(model.config)
  params = {"params": hf_gpt_neox.gpt_neox_from_state_dict(model.state_dict(), config)}
  decoder = Decoder(config)

  def prefill(p, inputs, ids, positions, lengths, cache):
    logits, cache = decoder.apply(p, ids, positions=positions, cache=cache)
    return logits, cache, ()

  decoding = Decoding(max_length=64, init_cache=lambda b, s: init_decoder_cache(config, b, s), prefill=prefill,
                      step=lambda p, tok, pos, ctx, cache: decoder.apply(p, tok, positions=pos, cache=cache))
  prompt = np.random.default_rng(1).integers(0, 97, size=(1, 6)).astype(np.int32)
  with torch.no_grad():
    want = model.generate(torch.from_numpy(prompt).long(), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                          pad_token_id=0).numpy()[0, 6:]
  got = Generator(decoding).generate(params, None, prompt, 8)
  assert got.tokens[0].tolist() == want.tolist()


def test_a_state_dict_that_disagrees_with_its_config_lists_every_bad_key():
  model = _tiny_neox(True)
  config = hf_gpt_neox.config_from_hf_gpt_neox(model.config)
  sd = dict(model.state_dict())
  del sd["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
  sd["gpt_neox.layers.0.attention.dense.weight"] = torch.zeros(48, 47)
  sd["gpt_neox.layers.0.extra.weight"] = torch.zeros(3)
  with pytest.raises(ValueError) as err:
    hf_gpt_neox.gpt_neox_from_state_dict(sd, config)
  for key in ("gpt_neox.layers.1.mlp.dense_4h_to_h.bias", "gpt_neox.layers.0.attention.dense.weight: shape (48, 47)",
              "gpt_neox.layers.0.extra.weight"):
    assert key in str(err.value)
  with pytest.raises(ValueError, match="norm='layer'"):
    hf_gpt_neox.gpt_neox_from_state_dict(sd, config.__class__(**{**config.__dict__, "norm": "rms"}))
