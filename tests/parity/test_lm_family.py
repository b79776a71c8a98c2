"""Parity of the `lm` family against transformers: a tiny random HF LlamaForCausalLM (GQA,
untied, perturbed norms) imported through the family's importer gives its logits (float32,
<= 1e-4) unrolled and scanned, and the family's cached generation gives HF's greedy tokens."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmjax import families
from mmjax.families.lm import convert
from mmjax.families.lm.model import LanguageModel
from mmjax.infer import Generator

pytestmark = pytest.mark.parity


def _tiny_llama() -> transformers.LlamaForCausalLM:
  torch.manual_seed(1)
  config = transformers.LlamaConfig(
      vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
      num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
      tie_word_embeddings=False)
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("layernorm.weight") or name == "model.norm.weight":
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_lm_family_logits_equal_hf_llama(scan):
  model = _tiny_llama()
  config = convert.config_from_hf(model.config, scan_layers=scan)
  params = families.get("lm").importers["hf_llama"](model.state_dict(), config)
  ids = np.random.default_rng(0).integers(0, 101, size=(2, 13)).astype(np.int32)
  with torch.no_grad():
    want = model(torch.from_numpy(ids).long()).logits.numpy()
  got, _ = LanguageModel(config).apply({"params": params}, jnp.asarray(ids))
  diff = float(np.max(np.abs(np.asarray(got) - want)))
  print(f"max |logits - hf| = {diff:.2e} (scan_layers={scan})")
  assert diff <= 1e-4


def test_lm_family_cached_generation_gives_hf_greedy_tokens():
  model = _tiny_llama()
  config = convert.config_from_hf(model.config)
  params = convert.lm_from_state_dict(model.state_dict(), config)
  prompt = np.random.default_rng(1).integers(0, 101, size=(1, 7)).astype(np.int32)
  with torch.no_grad():
    want = model.generate(torch.from_numpy(prompt).long(), max_new_tokens=8, do_sample=False,
                          min_new_tokens=8, pad_token_id=0).numpy()[0, 7:]
  got = Generator(families.get("lm").decoding(config)).generate({"params": params}, None, prompt, 8)
  assert got.tokens[0].tolist() == want.tolist()
