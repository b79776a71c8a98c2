"""Image-text pairs for contrastive training: one record -> one image and one fixed-length text.

An example (S = image_size, T = text_length):

  images          uint8   [S, S, 3]  the record's one image, resized, not normalised
  input_ids       int32   [T]        the text's ids, then EOS, then pad (no BOS: CLIP pools
                                     at the end-of-text token, SigLIP at the last position)
  text_mask       int32   [T]        1 on the text and its EOS, 0 on padding
  text_truncated  float32 []         1 if the text was cut to fit T (the trainer reports the
                                     fraction of each batch, so no cut goes uncounted)

The text is the record's with `<image>` and `<|endofchunk|>` removed (the embedded
captions read "<image>a red circle and a blue square.<|endofchunk|>"; an imported dataset
whose records hold one image and a caption reads the same way).

Bad records (skipped and counted by the pipeline, or raised, as `preprocess` does):
"empty_text" (no word left), "not_a_pair" (a record with no image or more than one: an
interleaved document is not a pair), "text_too_long" (with `truncate=False`), and the
image reasons of `preprocess.decode_image`.
"""

from __future__ import annotations

import numpy as np

from mmjax.data.preprocess import BadImageError, BadRecordError, RecordBuilder, decode_image
from mmjax.data.scenes import END_OF_CHUNK_TOKEN, IMAGE_TOKEN
from mmjax.data.tokenizer import Tokenizer

# The pair datasets read when a config names none: the embedded captions.
DEFAULT_MIXTURE = "captions:1"


def caption_text(text: str | bytes) -> str:
  """The words of a record's text: `<image>` and `<|endofchunk|>` removed, spaces trimmed."""
  text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
  return " ".join(text.replace(IMAGE_TOKEN, " ").replace(END_OF_CHUNK_TOKEN, " ").split())


def encode_text(tokenizer: Tokenizer, text: str, length: int, *, truncate: bool) -> tuple[np.ndarray, np.ndarray, bool]:
  """(ids int32 [T], mask int32 [T], truncated): text ids + EOS, padded with pad.

  A text whose ids and EOS exceed T is cut to T - 1 ids + EOS with `truncate`, else raises
  ValueError naming both lengths; an empty text raises ValueError.
  """
  if length < 2:
    raise ValueError(f"text_length={length}; expected >= 2 (a word and the end-of-text token)")
  ids = tokenizer.encode(text)
  if not ids:
    raise ValueError(f"text {text!r} has no tokens")
  truncated = len(ids) + 1 > length
  if truncated:
    if not truncate:
      raise ValueError(f"text {text[:80]!r} has {len(ids)} tokens + end-of-text, more than text_length={length}")
    ids = ids[:length - 1]
  ids = ids + [tokenizer.eos_id]
  out = np.full((length,), tokenizer.pad_id, np.int32)
  out[:len(ids)] = ids
  return out, (np.arange(length) < len(ids)).astype(np.int32), truncated


class PairBuilder(RecordBuilder):
  """Callable record -> pair example (or bad-record marker); picklable for grain workers."""

  def __init__(self, tokenizer: Tokenizer, text_length: int, image_size: int, *, truncate: bool = False,
               bad_data: str = "skip", with_record_ids: bool = False):
    super().__init__(bad_data, with_record_ids)
    if text_length < 2 or image_size < 1:
      raise ValueError(f"text_length={text_length}, image_size={image_size}; expected >= 2 and >= 1")
    self.tokenizer, self.text_length, self.image_size, self.truncate = tokenizer, text_length, image_size, truncate

  def _build(self, record: dict, record_id: str) -> dict:
    return self.build(record, record_id)

  def build(self, record: dict, record_id: str = "?") -> dict:
    images = list(record.get("images", []))
    if len(images) != 1:
      raise BadRecordError(record_id, "not_a_pair", f"{len(images)} images; an image-text pair has exactly one")
    text = caption_text(record["text"])
    if not text:
      raise BadRecordError(record_id, "empty_text", f"text {record['text'][:80]!r} has no words")
    try:
      ids, mask, truncated = encode_text(self.tokenizer, text, self.text_length, truncate=self.truncate)
    except ValueError as e:
      raise BadRecordError(record_id, "text_too_long", str(e)) from e
    try:
      pixels = decode_image(bytes(images[0]), self.image_size)
    except BadImageError as e:
      raise BadRecordError(record_id, e.reason, str(e)) from e
    return {"images": pixels, "input_ids": ids, "text_mask": mask,
            "text_truncated": np.float32(truncated)}
