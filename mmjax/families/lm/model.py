"""A plain decoder-only language model: token ids [B, T] -> logits float32 [B, T, V].

Parameters: ``decoder`` (a ``mmjax.models.decoder.Decoder`` without inserts), the same
tree a multimodal family keeps its LM in, so a Flamingo run can start from an `lm` run's
checkpoint (``Family.adopt_params``). Every parameter is component ``lm``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from mmjax.models.decoder import Decoder, DecoderConfig

COMPONENTS = ("lm",)


@dataclasses.dataclass(frozen=True)
class LMConfig:
  decoder: DecoderConfig = DecoderConfig()


class LanguageModel(nn.Module):
  """Token ids Int[B, T] -> (logits float32 [B, T, V], the updated cache or None)."""

  config: LMConfig

  def setup(self):
    self.decoder = Decoder(self.config.decoder)

  def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None, cache: dict | None = None):
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids have shape {input_ids.shape}; expected [batch, length]")
    if input_ids.shape[1] > self.config.decoder.max_length:
      raise ValueError(f"sequence length {input_ids.shape[1]} exceeds the configured maximum "
                       f"{self.config.decoder.max_length}")
    return self.decoder(input_ids, positions=positions, cache=cache)


def param_labels(params: Any) -> Any:
  """Every leaf labelled 'lm' (boxed or not)."""
  return jax.tree.map(lambda _: "lm", params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
