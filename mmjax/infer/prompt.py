"""Interleaved image-text prompts (few-shot in-context prompting, as Flamingo is used).

``config`` below is any model config with ``media_token_id`` (the ``<image>`` id) and
``end_of_chunk_token_id`` fields.

A prompt is a sequence of segments: an image (UInt8/Float[H, W, 3]) becomes one ``<image>``
token, text (a str, encoded by the given function) or a list of ids is copied. Few-shot
prompts put each demonstration as ``<image>text<|endofchunk|>`` before the query.

Dimension letters: B batch, N images, H/W pixels, T length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

Segment = Any  # np.ndarray image [H, W, 3] | str | Sequence[int]


def interleave(
    segments: Sequence[Segment],
    config: Any,
    encode: Callable[[str], list[int]] | None = None,
    *,
    bos_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """(images [N, H, W, 3], ids Int32[T]) from image / text / id segments, in order."""
  images, ids = [], [] if bos_id is None else [bos_id]
  for seg in segments:
    if isinstance(seg, str):
      if encode is None:
        raise ValueError(f"text segment {seg!r} needs an encode function (e.g. Tokenizer.encode)")
      ids += list(encode(seg))
    elif isinstance(seg, np.ndarray) and seg.ndim == 3:
      images.append(seg)
      ids.append(config.media_token_id)
    else:
      seg = np.asarray(seg)
      if seg.ndim != 1 or not np.issubdtype(seg.dtype, np.integer):
        raise ValueError(
            f"segment of shape {seg.shape} and dtype {seg.dtype}; expected an image [H, W, 3],"
            " a str or a 1-D list of token ids")
      ids += seg.tolist()
  if not images:
    raise ValueError("the prompt has no image; expected at least one (use a text-only prompt with a text model)")
  return np.stack(images), np.asarray(ids, np.int32)


def few_shot(
    demonstrations: Sequence[tuple[np.ndarray, str]],
    query_image: np.ndarray,
    query_text: str,
    config: Any,
    encode: Callable[[str], list[int]],
    *,
    bos_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """``<image>demo text<|endofchunk|>`` per demonstration, then ``<image>query text``."""
  segments: list[Segment] = []
  for image, text in demonstrations:
    segments += [image, text, [config.end_of_chunk_token_id]]
  segments += [query_image, query_text]
  return interleave(segments, config, encode, bos_id=bos_id)


def batch(prompts: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int = 0) -> dict:
  """Pads prompts of different lengths and image counts into one batch.

  Returns {"images": [B, Nmax, H, W, 3], "prompt_ids": Int32[B, Tmax] (right-padded),
  "prompt_lengths": Int32[B], "image_mask": Bool[B, Nmax]} — the keyword arguments of
  ``generate`` (padding images are zeros, after the real ones).
  """
  if not prompts:
    raise ValueError("no prompts to batch")
  shapes = {tuple(images.shape[1:]) for images, _ in prompts}
  if len(shapes) != 1:
    raise ValueError(f"prompts hold images of different sizes {sorted(shapes)}; expected one")
  b = len(prompts)
  n = max(len(images) for images, _ in prompts)
  t = max(len(ids) for _, ids in prompts)
  first = prompts[0][0]
  images = np.zeros((b, n) + first.shape[1:], first.dtype)
  ids = np.full((b, t), pad_id, np.int32)
  mask = np.zeros((b, n), bool)
  lengths = np.zeros((b,), np.int32)
  for i, (img, tok) in enumerate(prompts):
    images[i, : len(img)] = img
    mask[i, : len(img)] = True
    ids[i, : len(tok)] = tok
    lengths[i] = len(tok)
  return {"images": images, "prompt_ids": ids, "prompt_lengths": lengths, "image_mask": mask}
