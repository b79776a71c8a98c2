"""One record -> one fixed-shape example, and the policy for records that cannot be one.

An example of an image bucket (N = max_images >= 1, T = text_length, S = image_size):

  images       uint8   [N, S, S, 3]  resized to S x S; NOT normalised: the model does it,
                                     because CLIP and SigLIP encoders use different
                                     mean/std. Empty slots are zeros.
  image_mask   bool    [N]           which image slots hold an image
  input_ids    int32   [T]           BOS, text ids, EOS (if the text was not truncated), pad
  image_index  int32   [T]           cumsum(input_ids == image_id): 0 = no image yet, i = the
                                     i-th image (1-based) is the last one before the token
  targets      int32   [T]           input_ids shifted left by one; the last one is pad
  loss_mask    float32 [T]           1 where the target is a text token; 0 where it is pad
                                     or `<image>` (an image is not predicted)

An example of a text-only bucket (`max_images=0`), for a language model trained on the
text of the same records: only

  input_ids    int32   [T]           BOS, text ids without any `<image>`, EOS (if the text
                                     was not truncated), pad
  targets      int32   [T]           input_ids shifted left by one; the last one is pad
  loss_mask    float32 [T]           1 where the target is not pad

The builder never touches the record's images, let alone decodes them (a text example
costs one tokenization), and drops its `<image>` tokens, so their count is not checked;
`<|endofchunk|>` stays, as text. Text longer than T is cut at T, wherever that falls: with
no image there is no chunk to keep whole. In both modes a truncated example is the one
without EOS.

Bad data (reasons below) is either skipped and counted (`bad_data="skip"`: the example
becomes a marker `{"bad_record": reason, "record_id": id}` that the pipeline drops,
counts and logs) or raised as `BadRecordError` naming the record (`bad_data="raise"`).
Text longer than T is not bad when it can be cut at a chunk boundary (before an `<image>`
or after an `<|endofchunk|>`), keeping at least one text token; the images after the
cut are dropped with it. A run of bad records with no good one between them ends in
`TooManyBadRecordsError` (the pipeline's `max_consecutive_bad_records`).

Images are decoded by `decode_image` (bytes) and `load_image_file` (a file named on a
command line); both raise `BadImageError` (a ValueError) with its bad-data reason: an
image whose header claims more than `MAX_IMAGE_PIXELS` pixels is "image_too_large"
before a pixel is decoded (a PNG of a few dozen bytes can claim 30000 x 30000), and
bytes that are not a whole image (garbage, empty, truncated) are "corrupt_image".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import io
import struct
from typing import BinaryIO

import numpy as np
from PIL import Image

from mmjax.data.tokenizer import Tokenizer

BAD_DATA_POLICIES = ("skip", "raise")
BAD_REASONS = (
    "corrupt_image",         # the bytes are not a whole image PIL can decode (or truncated)
    "image_too_large",       # the image header claims more than MAX_IMAGE_PIXELS pixels
    "too_many_images",       # more images than the bucket's N
    "empty_text",            # no text token besides <image> / <|endofchunk|>
    "text_too_long",         # longer than T with no chunk boundary to cut at
    "image_token_mismatch",  # number of <image> tokens != number of images
    "not_a_pair",            # an image-text pair (`pairs.PairBuilder`) without exactly one image
    "no_answer",             # a conversation (`conversation.ConversationBuilder`) with no assistant turn
    "image_too_small",       # an image the model's image layout (`conversation.SquareSlots`, AnyRes) refuses
)
# A text-only bucket touches no image and cuts text anywhere: only "empty_text" applies to it.


# mmjax's own limit, checked on the size in the header before any pixel is decoded; PIL's
# global `Image.MAX_IMAGE_PIXELS` (it warns above it and refuses above twice it) is left as
# it is, whatever a program set it to. An 8192 x 8192 RGB image takes 192 MiB to decode, in
# every worker that decodes one; photos of a 50-megapixel camera (8688 x 5792) pass, and no
# model here looks at more than a few hundred pixels a side.
MAX_IMAGE_PIXELS = 8192 * 8192


class BadRecordError(ValueError):
  """A record that cannot become an example, with the record's id and the reason."""

  def __init__(self, record_id: str, reason: str, detail: str):
    super().__init__(f"record {record_id!r}: {reason}: {detail}")
    self.record_id, self.reason, self.detail = record_id, reason, detail

  def __reduce__(self):  # rebuilt from its own arguments when a grain worker sends it back
    return type(self), (self.record_id, self.reason, self.detail)


class TooManyBadRecordsError(ValueError):
  """The last `consecutive` records were all bad: the data is broken, not a few records.

  Raised by the pipeline's bad-record counter, so that a dataset (or a mixture) with no
  good record stops training with this message instead of being skipped forever.
  """

  def __init__(self, consecutive: int, datasets: Sequence[str], counts: Mapping[str, int],
               last_record_id: str, last_reason: str):
    skipped = {reason: n for reason, n in counts.items() if n}
    super().__init__(
        f"{consecutive} consecutive bad records from the mixture of datasets {list(datasets)} "
        f"(the last: {last_record_id!r}, {last_reason}); bad records so far by reason: "
        f"{skipped}. The data is broken, not a few of its records: fix it (bad_data='raise' "
        "names the first bad record and why), or, where such a run is expected, raise the "
        "limit (make_pipeline's max_consecutive_bad_records, the config field "
        "data.max_consecutive_bad_records).")
    self.consecutive, self.datasets, self.counts = consecutive, tuple(datasets), skipped
    self.last_record_id, self.last_reason = last_record_id, last_reason

  def __reduce__(self):
    return type(self), (self.consecutive, self.datasets, self.counts, self.last_record_id,
                        self.last_reason)


class BadImageError(ValueError):
  """An image that cannot be decoded; `reason` is its bad-data reason (one of `BAD_REASONS`)."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason

  def __reduce__(self):
    return type(self), (self.reason, str(self))


@dataclasses.dataclass(frozen=True)
class Bucket:
  """The fixed shapes of a batch: a train step compiles once per bucket.

  `max_images=0` makes text-only examples (input_ids, targets, loss_mask), for a language
  model that trains on the text of the same data; `image_size` then shapes nothing.
  """
  max_images: int = 1   # N: image slots per example; 0: text only, no image is decoded
  text_length: int = 64  # T: tokens per example
  image_size: int = 64  # S: images are resized to S x S (the model's resolution)

  def __post_init__(self):
    if self.max_images < 0 or self.text_length < 2 or self.image_size < 1:
      raise ValueError(f"bucket {self}; expected max_images >= 0 (0: text only), "
                       "text_length >= 2, image_size >= 1")

  @property
  def text_only(self) -> bool:
    return self.max_images == 0


def _as_str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_image(data: bytes, image_size: int | None, name: str = "image") -> np.ndarray:
  """Encoded bytes -> uint8 [S, S, 3] (bilinear resize when the size differs; None keeps it).

  Raises `BadImageError` naming `name`: "image_too_large" when the header claims more than
  `MAX_IMAGE_PIXELS` pixels, "corrupt_image" when the bytes are not a whole image.
  """
  return _decode(io.BytesIO(data), image_size, name)


def load_image_file(path: str, image_size: int | None) -> np.ndarray:
  """The image file at `path` -> uint8 [S, S, 3] (S = image_size; None: its own size), for
  images given by hand.

  Raises ValueError naming the file when it cannot be read, and `BadImageError` (a
  ValueError) when it claims more than `MAX_IMAGE_PIXELS` pixels or is not a whole image.
  """
  if image_size is not None and image_size < 1:
    raise ValueError(f"image_size={image_size}; expected >= 1 (or None: the image's own size)")
  try:
    file = open(path, "rb")  # pylint: disable=consider-using-with
  except OSError as e:
    raise ValueError(f"image file {path!r} cannot be read: {e.strerror or e}") from e
  with file:
    return _decode(file, image_size, f"image file {path!r}")


def _decode(file: BinaryIO, image_size: int | None, name: str) -> np.ndarray:
  try:
    with Image.open(file) as image:
      _check_pixels(image.size, name)
      image = image.convert("RGB")  # PIL decodes lazily: a truncated file fails here
      if image_size is not None and image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
      return np.asarray(image, dtype=np.uint8)
  except (BadImageError, MemoryError):
    raise
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    # PIL's own check in `Image.open` came first (the default refuses 30000 x 30000; the
    # warning is raised where warnings are errors): name the size when the header says it.
    size = _png_size(file)
    if size is not None:
      _check_pixels(size, name)
    raise BadImageError("image_too_large", f"{name}: PIL refuses it as too large ({e}); "
                        f"mmjax's limit is {MAX_IMAGE_PIXELS:,} pixels") from e
  except Exception as e:  # PIL raises many types for bad bytes  # pylint: disable=broad-except
    raise BadImageError("corrupt_image", f"{name} cannot be decoded ({type(e).__name__}: {e})") from e


def _check_pixels(size: tuple[int, int], name: str) -> None:
  width, height = size
  if width * height > MAX_IMAGE_PIXELS:
    raise BadImageError("image_too_large", f"{name}: the header claims {width} x {height} = "
                        f"{width * height:,} pixels, more than the limit of {MAX_IMAGE_PIXELS:,} "
                        "(mmjax.data.preprocess.MAX_IMAGE_PIXELS)")


def _png_size(file: BinaryIO) -> tuple[int, int] | None:
  """(width, height) from a PNG's IHDR chunk, or None for anything else."""
  file.seek(0)
  header = file.read(24)
  if len(header) < 24 or header[:8] != b"\x89PNG\r\n\x1a\n" or header[12:16] != b"IHDR":
    return None
  return struct.unpack(">II", header[16:24])


class RecordBuilder:
  """Callable record -> example, or a bad-record marker under the bad-data policy (a
  `BadRecordError` raised by `_build` becomes {"bad_record": reason, "record_id": id} with
  "skip", or propagates with "raise"); picklable for grain workers."""

  def __init__(self, bad_data: str = "skip", with_record_ids: bool = False):
    if bad_data not in BAD_DATA_POLICIES:
      raise ValueError(f"bad_data={bad_data!r}; expected one of {BAD_DATA_POLICIES}")
    self.bad_data, self.with_record_ids = bad_data, with_record_ids

  def _build(self, record: dict, record_id: str) -> dict:
    raise NotImplementedError

  def __call__(self, record: dict) -> dict:
    record_id = _as_str(record.get("id", "?"))
    try:
      example = self._build(record, record_id)
    except BadRecordError as e:
      if self.bad_data == "raise":
        raise
      return {"bad_record": e.reason, "record_id": record_id}
    if self.with_record_ids:
      example["record_id"] = record_id
    return example


class ExampleBuilder(RecordBuilder):
  """Record -> the example of an image or text-only bucket (module docstring)."""

  def __init__(self, tokenizer: Tokenizer, bucket: Bucket, bad_data: str = "skip",
               truncate_images: bool = False, with_record_ids: bool = False):
    super().__init__(bad_data, with_record_ids)
    self.tokenizer, self.bucket, self.truncate_images = tokenizer, bucket, truncate_images

  def _build(self, record: dict, record_id: str) -> dict:
    if self.bucket.text_only:
      return self._build_text(record, record_id)
    tok, bucket = self.tokenizer, self.bucket
    n_max, t_max = bucket.max_images, bucket.text_length
    text = _as_str(record["text"])
    images = list(record.get("images", []))
    text_ids = tok.encode(text)
    specials = (tok.image_id, tok.end_of_chunk_id)
    if not any(i not in specials for i in text_ids):
      raise BadRecordError(record_id, "empty_text", f"text {text[:80]!r} has no words")
    n_tokens = sum(i == tok.image_id for i in text_ids)
    if n_tokens != len(images):
      raise BadRecordError(record_id, "image_token_mismatch",
                           f"text has {n_tokens} <image> tokens but the record has {len(images)} images")
    if len(images) > n_max and not self.truncate_images:
      raise BadRecordError(record_id, "too_many_images",
                           f"{len(images)} images; the bucket holds {n_max}")
    ids = [tok.bos_id] + text_ids + [tok.eos_id]
    if len(ids) > t_max or len(images) > n_max:
      ids = self._cut_at_chunk_boundary(ids, record_id, len(images) > n_max)
    n_images = sum(i == tok.image_id for i in ids)

    pixels = np.zeros((n_max, bucket.image_size, bucket.image_size, 3), np.uint8)
    for k, data in enumerate(images[:n_images]):
      try:
        pixels[k] = decode_image(bytes(data), bucket.image_size, f"image {k}")
      except BadImageError as e:
        raise BadRecordError(record_id, e.reason, str(e)) from e
    sequence = self._sequence(ids)
    return {
        "images": pixels,
        "image_mask": np.arange(n_max) < n_images,
        "input_ids": sequence["input_ids"],
        "image_index": np.cumsum(sequence["input_ids"] == tok.image_id, dtype=np.int32),
        "targets": sequence["targets"],
        "loss_mask": sequence["loss_mask"],
    }

  def _build_text(self, record: dict, record_id: str) -> dict:
    """A text-only example: the record's images are not touched, its `<image>` ids dropped."""
    tok = self.tokenizer
    text = _as_str(record["text"])
    # Dropped as ids, not as a substring before encoding: the text keeps the pieces it has
    # in an image bucket (the tokenizer encodes the parts around an `<image>` separately).
    text_ids = [i for i in tok.encode(text) if i != tok.image_id]
    if all(i == tok.end_of_chunk_id for i in text_ids):
      raise BadRecordError(record_id, "empty_text", f"text {text[:80]!r} has no words")
    ids = [tok.bos_id] + text_ids + [tok.eos_id]
    # Cut at T: the EOS goes with the cut, which marks truncation as the image mode does.
    return self._sequence(ids[:self.bucket.text_length])

  def _sequence(self, ids: list[int]) -> dict[str, np.ndarray]:
    """ids (at most T) -> input_ids, targets, loss_mask, each [T], padded with pad."""
    tok, t_max = self.tokenizer, self.bucket.text_length
    input_ids = np.full((t_max,), tok.pad_id, np.int32)
    input_ids[:len(ids)] = ids
    targets = np.full((t_max,), tok.pad_id, np.int32)
    targets[:len(ids) - 1] = ids[1:]
    # An image is not predicted; a text-only sequence holds none, so there the mask is
    # just "not pad".
    loss_mask = ((targets != tok.pad_id) & (targets != tok.image_id)).astype(np.float32)
    return {"input_ids": input_ids, "targets": targets, "loss_mask": loss_mask}

  def _cut_at_chunk_boundary(self, ids: list[int], record_id: str, too_many_images: bool) -> list[int]:
    """The longest prefix ending at a chunk boundary that fits T and N and has text."""
    tok, n_max, t_max = self.tokenizer, self.bucket.max_images, self.bucket.text_length
    specials = (tok.bos_id, tok.image_id, tok.end_of_chunk_id)
    best, images_so_far, has_text = None, 0, False
    for c in range(1, min(len(ids), t_max + 1)):
      # A cut at c keeps ids[:c]: before an <image>, or right after an <|endofchunk|>.
      at_boundary = ids[c] == tok.image_id or ids[c - 1] == tok.end_of_chunk_id
      has_text = has_text or ids[c - 1] not in specials
      images_so_far += ids[c - 1] == tok.image_id
      if at_boundary and has_text and images_so_far <= n_max:
        best = c
    if best is None:
      reason = "too_many_images" if too_many_images and len(ids) <= t_max else "text_too_long"
      raise BadRecordError(record_id, reason, f"{len(ids)} tokens and "
                           f"{sum(i == tok.image_id for i in ids)} images do not fit T={t_max}, "
                           f"N={n_max}, and no chunk boundary leaves a part that fits")
    return ids[:best]
