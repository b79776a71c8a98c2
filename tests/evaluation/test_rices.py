"""RICES against a NumPy brute force, its tie rule, the seeded random baseline, the on-disk
cache (reuse, keys, corruption, a read-only directory) and the tower of a contrastive or
Flamingo parameter tree.

The embedding function is a fixed random projection of the pixels, so every nearest
neighbour is known from the images alone."""

from __future__ import annotations

import errno
import logging
import os
import stat
import tempfile

import jax
import numpy as np
import pytest

from mmjax import zoo
from mmjax.evaluation import rices
from mmjax.families.contrastive import task as contrastive_task

SIDE, WIDTH, SUPPORT, QUERIES = 8, 16, 40, 12


class CountingTower:
  """A fixed random projection of the pixels, counting the images it embeds."""

  def __init__(self, seed: int = 0):
    self.projection = np.random.default_rng(seed).normal(size=(SIDE * SIDE * 3, WIDTH)).astype(np.float32)
    self.images_embedded = 0

  def __call__(self, images: np.ndarray) -> np.ndarray:
    self.images_embedded += images.shape[0]
    pixels = images.reshape(images.shape[0], -1).astype(np.float32) / 255.0 - 0.5
    return pixels @ self.projection

  def tower(self, identity: str = "projection-0") -> rices.ImageTower:
    return rices.ImageTower(embed=self, identity=identity)


def _images(n: int, seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, size=(n, SIDE, SIDE, 3), dtype=np.uint8)


def _brute_force(fn: CountingTower, queries: np.ndarray, support: np.ndarray, k: int) -> list[list[int]]:
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  similarity = unit(fn(queries).astype(np.float64)) @ unit(fn(support).astype(np.float64)).T
  return [list(np.argsort(-row)[:k][::-1]) for row in similarity]


def test_selection_is_the_k_nearest_by_cosine_most_similar_last():
  fn = CountingTower()
  support, queries = _images(SUPPORT, 1), _images(QUERIES, 2)
  selector = rices.RICES(fn.tower(), support, batch_size=7)
  for k in (1, 4, SUPPORT):
    chosen = selector.select(queries, k)
    assert chosen == _brute_force(fn, queries, support, k)
  unit = rices.normalize_rows(fn(queries)) @ rices.normalize_rows(fn(support)).T
  for row, picks in zip(unit, selector.select(queries, 5)):
    assert np.all(np.diff(row[picks]) > 0), "similarity rises towards the query"
  assert selector.select(queries, 0) == [[]] * QUERIES
  assert selector.select(queries[:0], 3) == []
  with pytest.raises(ValueError, match="assignment destination is read-only"):
    selector.embeddings[0, 0] = 1.0


def test_support_embeddings_are_unit_rows_in_support_order():
  fn = CountingTower()
  support = _images(SUPPORT, 1)
  selector = rices.RICES(fn.tower(), list(support), batch_size=16)  # a sequence of images, as a loader gives
  np.testing.assert_allclose(np.linalg.norm(selector.embeddings, axis=1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(selector.embeddings, rices.normalize_rows(fn(support)), rtol=1e-6, atol=1e-7)
  assert len(selector) == SUPPORT


def test_equal_similarities_rank_the_lower_index_as_more_similar():
  fn = CountingTower()
  support, query = _images(SUPPORT, 1), _images(1, 2)
  k = 5
  kth = _brute_force(fn, query, support, k)[0][0]  # the k-th nearest: on the boundary
  # A copy of it at index 0: the two tie exactly, and only one fits in the k.
  with_copy = np.concatenate([support[kth:kth + 1], support])
  chosen = rices.RICES(fn.tower(), with_copy).select(query, k)[0]
  assert chosen[0] == 0 and kth + 1 not in chosen
  # Both fit in k + 1: the lower index ranks as the more similar, so it comes later.
  chosen = rices.RICES(fn.tower(), with_copy).select(query, k + 1)[0]
  assert chosen[:2] == [kth + 1, 0]
  # All support rows equal: the order is by index, the lowest last.
  same = np.ones((6, WIDTH), np.float32)
  assert rices.nearest_examples(np.ones((1, WIDTH), np.float32), same, 3) == [[2, 1, 0]]


def test_an_excluded_query_is_never_its_own_example():
  fn = CountingTower()
  support = _images(SUPPORT, 1)
  selector = rices.RICES(fn.tower(), support)
  queries = support[[3, 9]]
  assert [row[-1] for row in selector.select(queries, 2)] == [3, 9]  # itself, the most similar
  chosen = selector.select(queries, 2, exclude=[3, 9])
  expected = [row[:-1] for row in _brute_force(fn, queries, support, 3)]
  assert chosen == expected
  assert len(selector.select(queries, SUPPORT - 1, exclude=[3, None])[0]) == SUPPORT - 1


def test_k_larger_than_the_support_set_is_an_error_naming_both():
  selector = rices.RICES(CountingTower().tower(), _images(SUPPORT, 1))
  with pytest.raises(ValueError, match=f"k={SUPPORT + 1} is larger than the support set of {SUPPORT} examples"):
    selector.select(_images(2, 2), SUPPORT + 1)
  with pytest.raises(ValueError, match=f"k={SUPPORT} is larger .* \\({SUPPORT - 1} once the query itself"):
    selector.select(_images(1, 2), SUPPORT, exclude=[0])
  with pytest.raises(ValueError, match="k=11 is larger than the support set of 10 examples"):
    rices.random_examples([0, 1], 10, 11, seed=0)
  with pytest.raises(ValueError, match="exclude has 1 entries but there are 2 queries"):
    rices.random_examples([0, 1], 10, 3, seed=0, exclude=[4])


def test_random_examples_are_distinct_seeded_and_independent_of_the_batch():
  ids = list(range(200))
  chosen = rices.random_examples(ids, 30, 8, seed=3)
  assert all(len(row) == 8 == len(set(row)) and all(0 <= i < 30 for i in row) for row in chosen)
  assert chosen == rices.random_examples(ids, 30, 8, seed=3)
  assert chosen != rices.random_examples(ids, 30, 8, seed=4)
  assert rices.random_examples(ids[50:60], 30, 8, seed=3) == chosen[50:60]
  # Every support index is drawn about equally often (200 x 8 draws over 30: 53 expected).
  counts = np.bincount(np.concatenate(chosen), minlength=30)
  assert counts.min() > 25 and counts.max() < 85
  # Excluding the query itself: never drawn; k = M - 1 then draws all the others.
  excluded = rices.random_examples(ids, 30, 29, seed=3, exclude=[i % 30 for i in ids])
  assert all(sorted(row) == [j for j in range(30) if j != i % 30] for i, row in zip(ids, excluded))


def test_a_second_construction_reads_the_cache_without_embedding_or_writing(tmp_path):
  fn = CountingTower()
  support, queries = _images(SUPPORT, 1), _images(QUERIES, 2)
  first = rices.RICES(fn.tower(), support, cache_dir=str(tmp_path), batch_size=8)
  assert fn.images_embedded == SUPPORT
  path = first.cache_path
  before = (open(path, "rb").read(), os.stat(path).st_mtime_ns)
  second = rices.RICES(fn.tower(), support, cache_dir=str(tmp_path), batch_size=8)
  assert fn.images_embedded == SUPPORT
  assert (open(path, "rb").read(), os.stat(path).st_mtime_ns) == before
  np.testing.assert_array_equal(second.embeddings, first.embeddings)
  assert second.select(queries, 4) == first.select(queries, 4)
  assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(path)]  # no temporary file left


def test_another_tower_support_set_or_dtype_does_not_reuse_the_cache(tmp_path):
  fn = CountingTower()
  support = _images(SUPPORT, 1)
  rices.RICES(fn.tower("tower-a"), support, cache_dir=str(tmp_path))
  changed = support.copy()
  changed[5, 0, 0, 0] ^= 1
  variants = [dict(tower=fn.tower("tower-b"), support=support),
              dict(tower=fn.tower("tower-a"), support=changed),
              dict(tower=fn.tower("tower-a"), support=support[:-1]),
              dict(tower=fn.tower("tower-a"), support=support, dtype="float16"),
              dict(tower=fn.tower("tower-a"), support=support, support_key="captions/train@64px")]
  for n, variant in enumerate(variants, start=2):
    embedded = fn.images_embedded
    rices.RICES(variant.pop("tower"), variant.pop("support"), cache_dir=str(tmp_path), **variant)
    assert fn.images_embedded > embedded, f"variant {n - 1} reused another key's cache"
    assert len(list(tmp_path.iterdir())) == n
  embedded = fn.images_embedded  # a support key stands for the images: these are not read
  rices.RICES(fn.tower("tower-a"), changed, cache_dir=str(tmp_path), support_key="captions/train@64px")
  assert fn.images_embedded == embedded


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte", "garbage", "empty"])
def test_a_damaged_cache_file_is_reported_and_recomputed(tmp_path, caplog, damage):
  fn = CountingTower()
  support = _images(SUPPORT, 1)
  good = rices.RICES(fn.tower(), support, cache_dir=str(tmp_path))
  content = open(good.cache_path, "rb").read()
  damaged = {"truncate": content[:-9], "flip_a_byte": content[:-5] + bytes([content[-5] ^ 0xFF]) + content[-4:],
             "garbage": b"\x00" * len(content), "empty": b""}[damage]
  with open(good.cache_path, "wb") as f:
    f.write(damaged)
  with caplog.at_level(logging.WARNING, logger=rices.__name__):
    again = rices.RICES(fn.tower(), support, cache_dir=str(tmp_path))
  assert fn.images_embedded == 2 * SUPPORT
  assert "is unusable" in caplog.text and good.cache_path in caplog.text
  np.testing.assert_array_equal(again.embeddings, good.embeddings)
  rices.RICES(fn.tower(), support, cache_dir=str(tmp_path))  # the recomputed file replaced it
  assert fn.images_embedded == 2 * SUPPORT


def test_a_valid_file_of_another_key_is_left_untouched(tmp_path, caplog):
  fn = CountingTower()
  support = _images(SUPPORT, 1)
  other = rices.RICES(fn.tower("tower-b"), support, cache_dir=str(tmp_path))
  mine = rices.RICES(fn.tower("tower-a"), support, cache_dir=str(tmp_path))
  os.replace(other.cache_path, mine.cache_path)  # as if another key had hashed to my name
  content = open(mine.cache_path, "rb").read()
  with caplog.at_level(logging.WARNING, logger=rices.__name__):
    rices.RICES(fn.tower("tower-a"), support, cache_dir=str(tmp_path))
  assert fn.images_embedded == 3 * SUPPORT
  assert "another key" in caplog.text
  assert open(mine.cache_path, "rb").read() == content


def test_a_read_only_cache_directory_warns_once_and_still_selects(tmp_path, caplog, monkeypatch):
  fn = CountingTower()
  support, queries = _images(SUPPORT, 1), _images(QUERIES, 2)
  cache = tmp_path / "read-only"
  cache.mkdir()
  cache.chmod(stat.S_IRUSR | stat.S_IXUSR)
  if os.access(cache, os.W_OK):  # root writes anyway: make the write fail as a read-only mount would
    def refuse(*args, **kwargs):
      raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(tempfile, "mkstemp", refuse)
  with caplog.at_level(logging.WARNING, logger=rices.__name__):
    first = rices.RICES(fn.tower(), support, cache_dir=str(cache))
    second = rices.RICES(fn.tower(), support, cache_dir=str(cache))
  assert fn.images_embedded == 2 * SUPPORT
  assert caplog.text.count("cannot write the embedding cache") == 1
  assert list(cache.iterdir()) == []
  assert first.select(queries, 3) == second.select(queries, 3) == _brute_force(fn, queries, support, 3)
  cache.chmod(stat.S_IRWXU)


@pytest.fixture(scope="module")
def clip_tiny():
  config = zoo.get("clip-tiny")
  params = contrastive_task.Model(config, config.text.max_length).init(jax.random.key(0))
  return config, params


def test_the_contrastive_tower_is_the_models_encode_image(clip_tiny):
  config, params = clip_tiny
  images = np.random.default_rng(0).integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)
  tower = rices.image_tower(config.vision, params, batch_size=4)
  embeddings = tower.embed(images)
  expected = contrastive_task.Model(config, config.text.max_length).module.apply(
      {"params": params}, images, method="encode_image")
  assert embeddings.shape == (5, config.embed_dim)
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(embeddings, np.asarray(expected), rtol=1e-5, atol=1e-6)
  assert tower.identity == rices.image_tower(config.vision, params).identity


def test_a_flamingo_tree_embeds_with_its_unprojected_vision_tower(clip_tiny):
  config, params = clip_tiny
  images = np.random.default_rng(1).integers(0, 256, size=(6, 64, 64, 3), dtype=np.uint8)
  flamingo_like = {"vision": params["vision"], "resampler": {}}
  tower = rices.image_tower(config.vision, flamingo_like, batch_size=4)
  embeddings = tower.embed(images)
  assert embeddings.shape == (6, config.vision.width)
  np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
  assert tower.identity != rices.image_tower(config.vision, params).identity
  selector = rices.RICES(tower, images, batch_size=4)
  assert [row[-1] for row in selector.select(images[[2, 5]], 3)] == [2, 5]
  with pytest.raises(ValueError, match="expected a 'vision' tower"):
    rices.image_tower(config.vision, {"decoder": {}})
