"""Logical axis names, and how they map onto a device mesh.

Every weight and activation in mmjax names its dimensions from this one vocabulary.
A rule set (an ordered list of ``(logical_name, mesh_axes)`` pairs, first match wins)
then says which mesh axis each name is split over; models never mention mesh axes.

Logical axes
------------
``batch``     examples in a batch (activations only).
``length``    text positions: tokens of the decoder, queries of a text cross-attention.
``embed``     the model width of a stream: the LM's hidden size, the vision tower's width,
              the resampler's width. Weights and activations alike.
``mlp``       the hidden width of a feed-forward block.
``heads``     attention (query) heads.
``kv_heads``  key/value heads of grouped-query attention (``heads`` is a multiple of it).
``kv``        the width of one head (head dim).
``vocab``     the vocabulary, of the embedding table and the output projection.
``images``    media items (images or videos) of one example.
``frames``    frames of one video (1 for still images).
``patches``   patch tokens of one image, out of the vision tower.
``latents``   the learned queries of a Perceiver Resampler (and its output tokens).
``cache``     positions of a decode-time key/value cache.
``norm``      a normalisation scale or bias vector (never sharded by default).
``conv_in``   the input pixels of a patch-embedding convolution (patch x patch x channels).

Mesh axes are ``data``, ``fsdp`` and ``tensor`` (plus ``dcn`` across slices).
"""

from __future__ import annotations

LOGICAL_AXES: tuple[str, ...] = (
    "batch",
    "length",
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "kv",
    "vocab",
    "images",
    "frames",
    "patches",
    "latents",
    "cache",
    "norm",
    "conv_in",
)


def check_logical_axes(names: tuple[str | None, ...]) -> tuple[str | None, ...]:
  """Returns ``names`` unchanged, or raises if one is not in the vocabulary."""
  for name in names:
    if name is not None and name not in LOGICAL_AXES:
      raise ValueError(f"logical axis {name!r} is not in the vocabulary {LOGICAL_AXES}")
  return names
