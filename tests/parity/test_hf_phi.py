"""Parity: a tiny random HF PhiForCausalLM (one shared LayerNorm per layer, parallel residual,
partial rotary 0.5, GELU-tanh MLP, biases, output bias) through `mmjax.convert.hf_phi`."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmjax.convert import hf_phi
from mmjax.models import scan_layout
from mmjax.models.decoder import Decoder

pytestmark = pytest.mark.parity


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_decoder_logits_equal_hf_phi(scan):
  torch.manual_seed(7)
  config = transformers.PhiConfig(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                                  num_attention_heads=6, max_position_embeddings=64)
  model = transformers.PhiForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layernorm" in name or name.endswith("bias"):
        p.add_(0.2 * torch.randn_like(p))
  ours = hf_phi.config_from_hf_phi(model.config, scan_layers=scan)
  assert (ours.rotary_fraction, ours.parallel_norms, ours.mlp) == (0.5, 1, "gelu_tanh")
  params = hf_phi.phi_from_state_dict(model.state_dict(), ours)
  assert "mlp_norm" not in params["layers_0"]
  if scan:
    params = scan_layout.stack_layers(params, ours.depth)
  ids = np.random.default_rng(8).integers(0, 97, size=(2, 10)).astype(np.int32)
  with torch.no_grad():
    want = model(torch.from_numpy(ids).long()).logits.numpy()
  got, _ = Decoder(ours).apply({"params": params}, jnp.asarray(ids))
  diff = float(np.max(np.abs(np.asarray(got) - want)))
  print(f"max |logits - hf phi| = {diff:.2e} (scan={scan})")
  assert diff <= 1e-4
