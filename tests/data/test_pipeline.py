"""The grain pipeline: fixed shapes, the batch contract, determinism, exact resume, mixtures."""

import collections
import dataclasses
import hashlib
import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest

from mmjax.data import pipeline
from mmjax.data.preprocess import Bucket

BUCKET = Bucket(max_images=3, text_length=48, image_size=24)
CONTRACT = {
    "images": (np.uint8, (4, 3, 24, 24, 3)),
    "image_mask": (np.bool_, (4, 3)),
    "input_ids": (np.int32, (4, 48)),
    "image_index": (np.int32, (4, 48)),
    "targets": (np.int32, (4, 48)),
    "loss_mask": (np.float32, (4, 48)),
}


def _make(data_dir, **kwargs):
  args = dict(data_dir=data_dir, batch_size=4, bucket=BUCKET, seed=0, truncate_images=True)
  return pipeline.make_pipeline(**{**args, **kwargs})


def _take(p, n):
  return [next(p) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert sorted(a) == sorted(b)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_every_batch_has_the_shapes_and_dtypes_of_its_bucket(data_dir):
  p = _make(data_dir, bucket=tuple(dataclasses.astuple(BUCKET)))  # a plain tuple works too
  assert isinstance(p, grain.DatasetIterator)  # grain's Orbax handler saves its state
  for batch in _take(p, 40):
    assert {k: (v.dtype.type, v.shape) for k, v in batch.items()} == CONTRACT


def test_batches_keep_the_contract_between_ids_images_targets_and_masks(data_dir, tokenizer):
  for batch in _take(_make(data_dir), 20):
    ids, targets = batch["input_ids"], batch["targets"]
    is_image = ids == tokenizer.image_id
    np.testing.assert_array_equal(batch["image_index"], np.cumsum(is_image, axis=1))
    np.testing.assert_array_equal(targets[:, :-1], ids[:, 1:])
    assert (targets[:, -1] == tokenizer.pad_id).all()
    expected_mask = (targets != tokenizer.pad_id) & (targets != tokenizer.image_id)
    np.testing.assert_array_equal(batch["loss_mask"], expected_mask.astype(np.float32))
    n_images = is_image.sum(axis=1)
    np.testing.assert_array_equal(batch["image_mask"].sum(axis=1), n_images)
    assert (batch["image_mask"][:, 0]).all()  # every record of the dataset has an image
    assert (ids[:, 0] == tokenizer.bos_id).all()
    # Real images are drawn (not blank); empty slots are zeros.
    for row in range(ids.shape[0]):
      real = batch["images"][row][batch["image_mask"][row]]
      assert (real.reshape(len(real), -1).std(axis=1) > 1).all()
      assert not batch["images"][row][~batch["image_mask"][row]].any()


def test_the_same_seed_gives_the_same_batches_and_another_seed_does_not(data_dir):
  a, b = _take(_make(data_dir), 6), _take(_make(data_dir), 6)
  _assert_same(a, b)
  c = _take(_make(data_dir, seed=1), 6)
  assert not all(np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))


def test_restoring_the_state_after_k_batches_continues_exactly(data_dir):
  k, more = 5, 4
  uninterrupted = _take(_make(data_dir), k + more)
  first = _make(data_dir)
  _take(first, k)
  state = json.loads(json.dumps(first.get_state()))  # the state survives a JSON checkpoint
  resumed = _make(data_dir)
  resumed.set_state(state)
  _assert_same(uninterrupted[k:], _take(resumed, more))


@pytest.mark.slow  # 15-40 s: out of the default tier, which must stay under 20 min on 2 cores
def test_two_worker_processes_give_the_in_process_batches_and_resume_exactly(data_dir):
  # One test for both properties: starting worker processes is the slow part.
  k, more = 4, 3
  in_process = _take(_make(data_dir, num_workers=0), k + more)
  first = _make(data_dir, num_workers=2)
  try:
    _assert_same(in_process[:k], _take(first, k))
    state = json.loads(json.dumps(first.get_state()))
  finally:
    first.close()
  resumed = _make(data_dir, num_workers=2)
  try:
    resumed.set_state(state)
    _assert_same(in_process[k:], _take(resumed, more))
  finally:
    resumed.close()


def test_mixture_weights_set_the_proportions_of_datasets(data_dir):
  p = _make(data_dir, mixture={"captions": 3.0, "qa": 1.0}, with_record_ids=True, batch_size=8)
  kinds = collections.Counter(str(i).split("/")[0] for b in _take(p, 25) for i in b["record_id"])
  assert set(kinds) == {"captions", "qa"}
  assert abs(kinds["captions"] / sum(kinds.values()) - 0.75) < 0.05, kinds


def test_sqrt_mixture_weights_datasets_by_the_square_root_of_their_size():
  weights = pipeline.mixture_weights({"big": 400, "small": 100}, "sqrt")
  assert weights == {"big": 20.0, "small": 10.0}
  with pytest.raises(ValueError, match="expected a dict of weights or 'sqrt'"):
    pipeline.mixture_weights({"a": 1}, "cube")


def test_one_epoch_without_shuffling_reads_every_record_once(data_dir):
  p = _make(data_dir, split="validation", mixture={"qa": 1.0}, num_epochs=1, shuffle=False,
            with_record_ids=True, batch_size=5)
  ids = [str(i) for b in p for i in b["record_id"]]
  assert sorted(ids) == [f"qa/validation/{i:06d}" for i in range(20)]


def test_unknown_dataset_names_are_refused(data_dir):
  with pytest.raises(ValueError, match="mixture names"):
    _make(data_dir, mixture={"laion": 1.0})


def _digest(batches):
  h = hashlib.sha256()
  for batch in batches:
    for key in sorted(batch):
      h.update(key.encode() + np.ascontiguousarray(batch[key]).tobytes())
  return h.hexdigest()


def test_another_process_with_another_hash_seed_gives_the_same_batches(data_dir):
  code = ("import sys; sys.path.insert(0, '.'); from tests.data import test_pipeline as t; "
          f"print('DIGEST=' + t._digest(t._take(t._make({data_dir!r}), 4)))")
  env = dict(os.environ, PYTHONHASHSEED="12345", JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120, check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  digest = next(l for l in out.stdout.splitlines() if l.startswith("DIGEST="))[7:]
  assert digest == _digest(_take(_make(data_dir), 4))
