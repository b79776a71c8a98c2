"""Flamingo: vision tower -> Perceiver Resampler -> decoder with gated cross-attention.

Dimension letters: B batch, N images, H/W pixels, T text length, V vocabulary.
"""

from __future__ import annotations

import dataclasses

from mmjax.models.decoder import DecoderConfig
from mmjax.models.perceiver import PerceiverConfig
from mmjax.models.vit import ViTConfig


@dataclasses.dataclass(frozen=True)
class FlamingoConfig:
  vision: ViTConfig = ViTConfig()
  resampler: PerceiverConfig = PerceiverConfig()
  decoder: DecoderConfig = DecoderConfig(cross_attn_every_n_layers=4)
  # Token id of <image>; image_index = cumsum(input_ids == media_token_id).
  media_token_id: int = 32000
  # Token id of <|endofchunk|>.
  end_of_chunk_token_id: int = 32001
