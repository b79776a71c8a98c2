"""The grain input pipeline: ArrayRecord sources -> fixed-shape batches, checkpointable.

  per dataset: source -> shard by JAX process -> seeded shuffle (reshuffled every epoch)
               -> repeat
  mixture (weights, or "sqrt": proportional to sqrt(size), InstructBLIP's resampling)
  -> decode + resize images (none in a text-only bucket), tokenize, pad into the bucket
     (`preprocess.ExampleBuilder`)
  -> [worker processes] -> drop and count bad records -> batch (drop remainder)

Bad records (`preprocess.BAD_REASONS`: corrupt_image, image_too_large, too_many_images,
empty_text, text_too_long, image_token_mismatch; the pair and conversation builders add
not_a_pair, no_answer and image_too_small) are dropped and counted by reason
(`bad_data="skip"`) or raise `BadRecordError` naming the record (`bad_data="raise"`).
A run of `max_consecutive_bad_records` bad records with no good one between them raises
`TooManyBadRecordsError` naming the mixture's datasets: the datasets repeat, so without
the limit a dataset with no good record would be skipped through forever.

Batches (B batch, N max_images, T text_length, S image_size) — see `preprocess`:
`images` uint8 [B, N, S, S, 3], `image_mask` bool [B, N], `input_ids` int32 [B, T],
`image_index` int32 [B, T], `targets` int32 [B, T], `loss_mask` float32 [B, T].
A text-only bucket (N = 0, for a language model on the same data) gives only `input_ids`,
`targets` and `loss_mask`: `<image>` tokens are dropped from the text and no image is
decoded.

Every step is a deterministic function of (seed, index), and the record-level work happens
before the worker split, so the batches are the same for any `num_workers`;
`get_state()` / `set_state()` resume exactly (the state is a JSON-able dict: save it with
the model, or resume replays data).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from absl import flags
import grain
import numpy as np

from mmjax.data import builders
from mmjax.data.preprocess import BAD_REASONS, Bucket, ExampleBuilder, TooManyBadRecordsError
from mmjax.data.tokenizer import Tokenizer

_log = logging.getLogger(__name__)

# Flamingo weighted interleaved documents 1.0 and image-text pairs 0.2; the questions teach
# the answer format that evaluation asks for.
DEFAULT_MIXTURE = {"interleaved": 1.0, "captions": 0.2, "qa": 1.0}
# In a mixture of which even 2% of the records are good, 1000 given records in a row are
# all bad with probability 0.98^1000 = 2e-9; a mixture with no good record reaches it within
# seconds instead of skipping bad records forever.
DEFAULT_MAX_CONSECUTIVE_BAD_RECORDS = 1000


class _DropBadRecordsIterator(grain.DatasetIterator):
  """Drops bad-record markers, counting them by reason; the counts are part of the state.

  Raises `TooManyBadRecordsError` after `max_consecutive_bad_records` bad records in a row.
  """

  def __init__(self, parent, max_consecutive_bad_records: int, datasets: tuple[str, ...]):
    super().__init__(parent)
    self.max_consecutive_bad_records, self.datasets = max_consecutive_bad_records, datasets
    self.counts = {reason: 0 for reason in BAD_REASONS}
    self.consecutive = 0  # bad records since the last good one

  def __next__(self):
    while True:
      example = next(self._parent)
      if "bad_record" not in example:
        self.consecutive = 0
        return example
      reason = str(example["bad_record"])
      self.counts[reason] = self.counts.get(reason, 0) + 1
      self.consecutive += 1
      total = sum(self.counts.values())
      if total <= 10 or total & (total - 1) == 0:  # every record at first, then sparser
        _log.warning("skipped record %s (%s); skipped so far: %s", example["record_id"], reason,
                     {k: v for k, v in self.counts.items() if v})
      if self.consecutive >= self.max_consecutive_bad_records:
        raise TooManyBadRecordsError(self.consecutive, self.datasets, self.counts,
                                     str(example["record_id"]), reason)

  def get_state(self):
    # The run of bad records is part of the state, so that a restored iterator gives up on
    # the same record as one that never stopped. Between batches it is 0 (a batch ends with
    # a good record); a state saved before it existed restores as 0.
    return {"parent": self._parent.get_state(), "bad_data_counts": dict(self.counts),
            "consecutive_bad_records": self.consecutive}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self.counts = {**{reason: 0 for reason in BAD_REASONS}, **state["bad_data_counts"]}
    self.consecutive = int(state.get("consecutive_bad_records", 0))


class _DropBadRecords(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset, max_consecutive_bad_records: int,
               datasets: list[str]):
    super().__init__(parent)
    self.max_consecutive_bad_records, self.datasets = max_consecutive_bad_records, tuple(datasets)

  def __iter__(self):
    return _DropBadRecordsIterator(self._parent.__iter__(), self.max_consecutive_bad_records,
                                   self.datasets)


class Pipeline(grain.DatasetIterator):
  """An iterator of batches with `get_state()`, `set_state()` and `bad_data_counts`.

  A `grain.DatasetIterator`, so grain's Orbax handler (`grain.checkpoint.CheckpointSave`)
  saves its state as JSON beside the model.
  """

  def __init__(self, dataset: grain.IterDataset, bucket: Bucket, batch_size: int):
    self._iterator = dataset.__iter__()
    super().__init__(self._iterator)
    self.bucket, self.batch_size = bucket, batch_size
    node = self._iterator
    while not isinstance(node, _DropBadRecordsIterator):
      node = node._parent  # pylint: disable=protected-access
    self._counter = node

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict:
    return self._iterator.get_state()

  def set_state(self, state: dict) -> None:
    self._iterator.set_state(state)

  @property
  def bad_data_counts(self) -> dict[str, int]:
    """Records skipped so far, by reason (counted since the start, across resumes)."""
    return dict(self._counter.counts)



def mixture_weights(sizes: Mapping[str, int], mixture: Mapping[str, float] | str) -> dict[str, float]:
  """Weights per dataset: given, or "sqrt" (proportional to the square root of sizes)."""
  if mixture == "sqrt":
    return {name: math.sqrt(n) for name, n in sizes.items()}
  if isinstance(mixture, str):
    raise ValueError(f"mixture={mixture!r}; expected a dict of weights or 'sqrt'")
  weights = {name: float(w) for name, w in mixture.items() if w > 0}
  if not weights:
    raise ValueError(f"mixture={dict(mixture)}; expected at least one positive weight")
  return weights


def _seed(*parts: int) -> int:
  return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _shard() -> tuple[int, int]:
  options = grain.sharding.ShardByJaxProcess(drop_remainder=False)
  return options.shard_index, options.shard_count


def _mixture_datasets(data_dir: str | None, mixture: Mapping[str, float] | str | None) -> list[str]:
  """The names of the datasets of `data_dir` that `mixture` reads (`example_dataset`'s)."""
  mixture = DEFAULT_MIXTURE if mixture is None else mixture
  names = builders.dataset_names(data_dir)
  if isinstance(mixture, str):
    return [n for n in names if n in DEFAULT_MIXTURE] or names
  unknown = sorted(set(mixture) - set(names))
  if unknown:
    raise ValueError(f"mixture names {unknown}; the data dir holds {names}")
  return [n for n in mixture if mixture[n] > 0]


def example_dataset(data_dir: str | None = None, split: str = "train",
                    bucket: Bucket = Bucket(), seed: int = 0,
                    mixture: Mapping[str, float] | str | None = None,
                    shard_by_jax_process: bool = True, bad_data: str = "skip",
                    num_epochs: int | None = None, shuffle: bool = True,
                    tokenizer: Tokenizer | None = None, truncate_images: bool = False,
                    with_record_ids: bool = False, builder=None) -> grain.MapDataset:
  """The record-level part of the pipeline: a `MapDataset` of examples or bad markers.

  `num_epochs=None` repeats forever (training); with a number, one pass over the
  mixture stops when its first dataset runs out. `builder` (record -> example or bad
  marker, picklable) replaces the `ExampleBuilder` of `bucket` (`pairs.PairBuilder`).
  """
  mixture = DEFAULT_MIXTURE if mixture is None else mixture
  chosen = _mixture_datasets(data_dir, mixture)
  sources = {n: builders.open_split(data_dir, n, split) for n in chosen}
  weights = mixture_weights({n: len(s) for n, s in sources.items()},
                            mixture if isinstance(mixture, str) else {n: mixture[n] for n in chosen})
  shard_index, shard_count = _shard() if shard_by_jax_process else (0, 1)
  parts = []
  for k, name in enumerate(weights):
    ds = grain.MapDataset.source(sources[name])[shard_index::shard_count]
    if shuffle:
      ds = ds.shuffle(seed=_seed(seed, k))
    parts.append(ds.repeat(num_epochs) if num_epochs != 1 else ds)
  mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, list(weights.values()))
  if builder is None:
    tokenizer = tokenizer or builders.load_tokenizer(data_dir)
    builder = ExampleBuilder(tokenizer, bucket, bad_data, truncate_images, with_record_ids)
  return mixed.map(builder)


def make_pipeline(data_dir: str | None = None, split: str = "train", batch_size: int = 8,
                  bucket: Bucket = Bucket(), seed: int = 0,
                  mixture: Mapping[str, float] | str | None = None, num_workers: int = 0,
                  shard_by_jax_process: bool = True, bad_data: str = "skip",
                  num_epochs: int | None = None, shuffle: bool = True,
                  tokenizer: Tokenizer | None = None, truncate_images: bool = False,
                  with_record_ids: bool = False, read_threads: int = 2,
                  max_consecutive_bad_records: int = DEFAULT_MAX_CONSECUTIVE_BAD_RECORDS,
                  builder=None) -> Pipeline:
  """Fixed-shape batches of `split` from the datasets of `data_dir`.

  Args:
    data_dir: holds `mmjax_data.json` (`mmjax data build`); default `default_data_dir()`.
    split: "train", "validation" or "test" (or an imported dataset's split).
    batch_size: B, per JAX process.
    bucket: `Bucket` or a tuple (max_images N, text_length T, image_size S); N = 0 gives
      text-only batches (input_ids, targets, loss_mask) and decodes no image.
    seed: shuffling seed; the same seed gives the same batches.
    mixture: dataset name -> weight (default `DEFAULT_MIXTURE`), or "sqrt".
    num_workers: grain worker processes (0: in this process); batches do not depend on it.
    shard_by_jax_process: each JAX process reads its own disjoint slice of every dataset.
    bad_data: "skip" (drop, count, log) or "raise" (`BadRecordError` naming the record).
    num_epochs: None repeats forever.
    shuffle: False reads in stored order (evaluation).
    tokenizer: default: the data directory's.
    truncate_images: cut a record with more than N images at a chunk boundary instead of
      treating it as bad data.
    with_record_ids: add `record_id` (str [B]) to each batch, to see which records it holds.
    read_threads: threads prefetching records in each process.
    max_consecutive_bad_records: after this many bad records in a row (skipped with
      bad_data="skip"), raise `TooManyBadRecordsError` naming the datasets instead of
      skipping on (the datasets repeat: one with no good record would never end).
    builder: record -> example or bad marker (picklable), instead of the `ExampleBuilder`
      of `bucket`: image-text pairs (`mmjax.data.pairs.PairBuilder`) for contrastive towers.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}; expected >= 1")
  if max_consecutive_bad_records < 1:
    raise ValueError(f"max_consecutive_bad_records={max_consecutive_bad_records}; expected >= 1 "
                     "(the bad records in a row after which the pipeline gives up)")
  if not isinstance(bucket, Bucket):
    bucket = Bucket(*bucket)  # a plain (max_images, text_length, image_size) tuple
  if num_workers < 0:
    raise ValueError(f"num_workers={num_workers}; expected >= 0")
  examples = example_dataset(data_dir, split, bucket, seed, mixture, shard_by_jax_process,
                             bad_data, num_epochs, shuffle, tokenizer, truncate_images,
                             with_record_ids, builder)
  ds = examples.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=64))
  if num_workers > 0:
    # grain's worker processes read absl flags; a program that is not an absl app (pytest,
    # a notebook, `mmjax`) has not parsed them, so they keep their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  datasets = _mixture_datasets(data_dir, mixture)
  ds = _DropBadRecords(ds, max_consecutive_bad_records, datasets).batch(batch_size, drop_remainder=True)
  return Pipeline(ds, bucket, batch_size)
