"""RICES: retrieval-based in-context example selection for few-shot evaluation, and its
baseline, k examples drawn at random.

RICES (Yang et al. 2022, as Flamingo and OpenFlamingo evaluate) gives each query the k
support examples (the training split) whose images are nearest to the query's image by
cosine similarity of an image tower's embeddings, placed so that the MOST similar example
comes LAST, right before the query (OpenFlamingo's `open_flamingo/eval/rices.py` reverses
its descending ranking the same way).

- ``ImageTower``: an embedding function and a string that identifies it; ``image_tower``
  builds one from a contrastive (CLIP / SigLIP) or Flamingo parameter tree.
- ``RICES``: the support set's unit embeddings, computed in batches and cached on disk;
  ``select`` returns the chosen support indices per query.
- ``nearest_examples``: the ranking itself, on embeddings; ``random_examples``: the seeded
  random baseline, in the same shape.

Ties: examples of equal similarity (duplicate support images) rank by support index, the
lower index as the more similar, so it is the one kept at the top-k boundary and the one
placed nearer the query.

The cache (``cache_dir``): one file per (tower identity, support set, count, dtype), named
by the SHA-256 of that key, holding the key, the array's shape and dtype and the SHA-256 of
its bytes. A file that fails any check is reported and recomputed; it is then replaced
whole (a new file renamed over it, never rewritten in place), while a readable file that
holds another key is left as it is. Files are written to a temporary file in the same
directory, synced, and renamed into place, so a reader never sees half of one. A directory
that cannot be written is warned about once and the embeddings are used uncached.

Dimension letters: Q queries, M support examples, D embedding width, N images of a batch,
S image side.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.layers.linear import dense
from mmjax.models.vit import ViTConfig, VisionTransformer, normalize_images

_log = logging.getLogger(__name__)

# The first line of every cache file; a new layout gets a new version.
CACHE_MAGIC = b"mmjax-rices-embeddings 1\n"
CACHE_DTYPES = ("float32", "float16")
# Directories whose failed cache write was already reported (the warning comes once).
_UNWRITABLE_REPORTED: set[str] = set()


@dataclasses.dataclass(frozen=True)
class ImageTower:
  """An image-embedding function and what identifies it."""
  # uint8 images [N, S, S, 3] -> Float[N, D] (RICES normalises the rows, whatever it returns).
  embed: Callable[[np.ndarray], np.ndarray]
  # Everything the embeddings depend on (a hash of the tower's config and parameters): two
  # towers that embed differently must have different identities, or they share a cache.
  identity: str | bytes


# ------------------------------------------------------------------------------ selection

def _exclusions(exclude: Sequence[int | None] | None, num_queries: int, support_size: int) -> list[int | None]:
  if exclude is None:
    return [None] * num_queries
  exclude = list(exclude)
  if len(exclude) != num_queries:
    raise ValueError(f"exclude has {len(exclude)} entries but there are {num_queries} queries; expected one per "
                     "query (a support index, or None)")
  for i, e in enumerate(exclude):
    if e is not None and not 0 <= int(e) < support_size:
      raise ValueError(f"exclude[{i}]={e} is not an index of the {support_size} support examples")
  return [None if e is None else int(e) for e in exclude]


def _check_k(k: int, support_size: int, excluding: bool) -> None:
  if k < 0:
    raise ValueError(f"k={k}; expected k >= 0 examples per query")
  available = support_size - int(excluding)
  if k > available:
    also = f" ({available} once the query itself is excluded)" if excluding else ""
    raise ValueError(f"k={k} is larger than the support set of {support_size} examples{also}; expected "
                     f"k <= {available}")


def normalize_rows(x: np.ndarray) -> np.ndarray:
  """Float32[..., D] rows of unit length (a zero row stays zero)."""
  x = np.asarray(x, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))


def nearest_examples(query_embeddings: np.ndarray, support_embeddings: np.ndarray, k: int, *,
                     exclude: Sequence[int | None] | None = None) -> list[list[int]]:
  """Float[Q, D], Float[M, D] -> per query, the k support indices nearest by cosine
  similarity, the MOST similar LAST; equal similarities rank the lower index as the more
  similar. ``exclude[q]``: a support index query q never gets (itself), or None."""
  support = normalize_rows(support_embeddings)
  queries = normalize_rows(query_embeddings)
  if queries.ndim != 2 or support.ndim != 2 or queries.shape[1] != support.shape[1]:
    raise ValueError(f"query embeddings {queries.shape} and support embeddings {support.shape}; expected [Q, D] "
                     "and [M, D] of the same width D")
  m = support.shape[0]
  excluded = _exclusions(exclude, queries.shape[0], m)
  _check_k(k, m, any(e is not None for e in excluded))
  similarity = queries @ support.T  # [Q, M]
  out = []
  for row, skip in zip(similarity, excluded):
    if skip is not None:
      row = row.copy()
      row[skip] = -np.inf
    out.append(_top_k(row, k)[::-1].tolist())
  return out


def _top_k(similarity: np.ndarray, k: int) -> np.ndarray:
  """Int[k]: the indices of the k largest of Float[M], largest first, ties by lower index."""
  m = similarity.shape[0]
  if k == 0:
    return np.zeros((0,), np.int64)
  if k < m:
    # Every value at least the k-th largest is a candidate (ties at the boundary included),
    # so the stable sort below decides them by index, not argpartition's arbitrary pick.
    kth = np.partition(similarity, m - k)[m - k]
    candidates = np.flatnonzero(similarity >= kth)
  else:
    candidates = np.arange(m)
  order = np.argsort(-similarity[candidates], kind="stable")
  return candidates[order[:k]]


def random_examples(query_ids: Sequence[int], support_size: int, k: int, *, seed: int,
                    exclude: Sequence[int | None] | None = None) -> list[list[int]]:
  """Per query, k distinct support indices drawn uniformly at random (the "random
  demonstrations" baseline, averaged over several seeds).

  Query q's draw comes from a generator seeded with (seed, query_ids[q]), so it depends on
  the seed and the query's id only, not on the batch the query is in. ``exclude[q]``: a
  support index query q never gets (itself, when the queries come from the support set).
  """
  ids = [int(i) for i in query_ids]
  if any(i < 0 for i in ids) or seed < 0:
    raise ValueError(f"seed={seed} and query_ids {ids[:8]}...; expected non-negative integers")
  excluded = _exclusions(exclude, len(ids), support_size)
  _check_k(k, support_size, any(e is not None for e in excluded))
  out = []
  for query_id, skip in zip(ids, excluded):
    rng = np.random.default_rng([seed, query_id])
    if skip is None:
      chosen = rng.choice(support_size, size=k, replace=False)
    else:  # draw among the other support_size - 1 and step over the excluded index
      chosen = rng.choice(support_size - 1, size=k, replace=False)
      chosen = chosen + (chosen >= skip)
    out.append([int(c) for c in chosen])
  return out


# ------------------------------------------------------------------------------ the support set

class RICES:
  """The support set's unit embeddings [M, D] and the nearest-example selection on them.

  ``support``: images uint8 [M, S, S, 3], or any sequence whose items are images [S, S, 3]
  (a loader that decodes on ``__getitem__``). ``support_key``: a string that identifies the
  support set (e.g. the dataset, split, image size and a hash of its record ids); without
  one, the images' bytes are hashed, which reads every image. ``cache_dir``: where the
  embeddings are cached (module docstring); None: not cached. ``dtype``: how the
  embeddings are stored, 'float32' or 'float16'.
  """

  def __init__(self, tower: ImageTower, support: Sequence[np.ndarray] | np.ndarray, *,
               support_key: str | bytes | None = None, cache_dir: str | None = None, batch_size: int = 64,
               dtype: str = "float32"):
    if dtype not in CACHE_DTYPES:
      raise ValueError(f"dtype={dtype!r}; expected one of {CACHE_DTYPES}")
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size}; expected >= 1")
    if len(support) == 0:
      raise ValueError("the support set is empty; expected at least one image to select examples from")
    self.tower = tower
    self.batch_size = batch_size
    self.dtype = dtype
    self.cache_path = None
    key = None
    if cache_dir is not None:
      key = cache_key(tower.identity, _support_digest(support, support_key), len(support), dtype)
      self.cache_path = os.path.join(cache_dir, f"rices-{key}.bin")
    cached = _read_cache(self.cache_path, key, len(support), dtype) if self.cache_path else None
    if cached is None:
      cached = self._embed_support(support)
      if self.cache_path:
        _write_cache(self.cache_path, key, cached)
    cached.setflags(write=False)
    self.embeddings = cached  # [M, D] unit rows, read-only
    self._support32 = np.asarray(cached, np.float32)

  def __len__(self) -> int:
    return self.embeddings.shape[0]

  def embed(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Images [N, S, S, 3] -> Float32[N, D] unit rows, through the tower in batches."""
    chunks = []
    for start in range(0, len(images), self.batch_size):
      batch = images[start:start + self.batch_size]
      batch = batch if isinstance(batch, np.ndarray) else np.stack(list(batch))
      out = np.asarray(self.tower.embed(batch))
      if out.ndim != 2 or out.shape[0] != batch.shape[0]:
        raise ValueError(f"the tower embedded {batch.shape[0]} images as an array of shape {out.shape}; expected "
                         f"[{batch.shape[0]}, D]")
      if not np.all(np.isfinite(out)):
        raise ValueError(f"the tower returned non-finite embeddings for images {start}..{start + len(batch) - 1}")
      chunks.append(normalize_rows(out))
    return np.concatenate(chunks)

  def _embed_support(self, support) -> np.ndarray:
    _log.info("RICES: embedding %d support images in batches of %d", len(support), self.batch_size)
    if isinstance(support, np.ndarray):
      return self.embed(support).astype(self.dtype)
    # A loader: read one batch at a time, never the whole set at once.
    out = []
    for start in range(0, len(support), self.batch_size):
      out.append(self.embed([support[i] for i in range(start, min(start + self.batch_size, len(support)))]))
    return np.concatenate(out).astype(self.dtype)

  def select(self, query_images: np.ndarray | Sequence[np.ndarray], k: int, *,
             exclude: Sequence[int | None] | None = None) -> list[list[int]]:
    """Per query image, the k nearest support indices, the most similar last
    (`nearest_examples`; ``exclude[q]``: a support index query q never gets)."""
    if len(query_images) == 0:
      return self.select_by_embedding(np.zeros((0, self.embeddings.shape[1]), np.float32), k, exclude=exclude)
    return self.select_by_embedding(self.embed(query_images), k, exclude=exclude)

  def select_by_embedding(self, query_embeddings: np.ndarray, k: int, *,
                          exclude: Sequence[int | None] | None = None) -> list[list[int]]:
    """`select` for queries already embedded: Float[Q, D]."""
    return nearest_examples(query_embeddings, self._support32, k, exclude=exclude)


# ------------------------------------------------------------------------------ the cache

def _as_bytes(value: str | bytes) -> bytes:
  return value.encode() if isinstance(value, str) else bytes(value)


def _support_digest(support, support_key: str | bytes | None) -> str:
  """SHA-256 of the support set: of its key when given, else of every image's shape, dtype and bytes."""
  h = hashlib.sha256()
  if support_key is not None:
    h.update(b"key\0" + _as_bytes(support_key))
    return h.hexdigest()
  h.update(b"images\0")
  for i in range(len(support)):
    image = np.ascontiguousarray(support[i])
    h.update(f"{image.shape}{image.dtype.str}".encode())
    h.update(image.tobytes())
  return h.hexdigest()


def cache_key(tower_identity: str | bytes, support_digest: str, count: int, dtype: str) -> str:
  """Hex SHA-256 naming one cache file: tower, support set, number of examples, stored dtype."""
  record = {"format": CACHE_MAGIC.decode().strip(), "tower": hashlib.sha256(_as_bytes(tower_identity)).hexdigest(),
            "support": support_digest, "count": int(count), "dtype": dtype}
  return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


class _BadCache(Exception):
  """A cache file that cannot be used; the message says why."""


def _parse(content: bytes) -> tuple[dict, bytes]:
  if not content.startswith(CACHE_MAGIC):
    raise _BadCache("it does not start with the RICES cache header")
  rest = content[len(CACHE_MAGIC):]
  end = rest.find(b"\n")
  if end < 0:
    raise _BadCache("its header is cut off")
  try:
    header = json.loads(rest[:end])
    shape, dtype, digest, key = list(header["shape"]), str(header["dtype"]), str(header["sha256"]), header["key"]
  except (ValueError, KeyError, TypeError) as e:
    raise _BadCache(f"its header does not parse ({e})") from None
  if dtype not in CACHE_DTYPES or len(shape) != 2:
    raise _BadCache(f"its header says shape {shape}, dtype {dtype!r}; expected [M, D] of {CACHE_DTYPES}")
  data = rest[end + 1:]
  expected = shape[0] * shape[1] * np.dtype(dtype).itemsize
  if len(data) != expected:
    raise _BadCache(f"it holds {len(data)} bytes of embeddings where its header says {expected} (truncated?)")
  if hashlib.sha256(data).hexdigest() != digest:
    raise _BadCache("its embeddings do not match their SHA-256")
  return {"key": key, "shape": shape, "dtype": dtype}, data


def _read_cache(path: str, key: str, count: int, dtype: str) -> np.ndarray | None:
  """The cached embeddings [count, D], or None (no file, or one that fails a check: reported)."""
  try:
    with open(path, "rb") as f:
      content = f.read()
  except FileNotFoundError:
    return None
  except OSError as e:
    _log.warning("RICES: cannot read the embedding cache %s (%s); computing the embeddings", path, e)
    return None
  try:
    header, data = _parse(content)
    if header["key"] != key:
      raise _BadCache(f"it holds the embeddings of another key ({str(header['key'])[:12]}...)")
    if header["shape"][0] != count or header["dtype"] != dtype:
      raise _BadCache(f"it holds {header['shape']} {header['dtype']} embeddings; expected {count} rows of {dtype}")
  except _BadCache as e:
    _log.warning("RICES: the embedding cache %s is unusable: %s; recomputing the embeddings", path, e)
    return None
  embeddings = np.frombuffer(data, dtype=dtype).reshape(header["shape"])
  _log.info("RICES: read %d support embeddings from %s", count, path)
  return embeddings


def _key_of_file(path: str) -> str | None:
  """The key a valid cache file holds, or None (no file, or an unusable one)."""
  try:
    with open(path, "rb") as f:
      return _parse(f.read())[0]["key"]
  except (OSError, _BadCache):
    return None


def _write_cache(path: str, key: str, embeddings: np.ndarray) -> None:
  """Writes the cache file whole (temporary file, fsync, rename) or warns once per
  directory why it could not; never replaces a valid file of another key."""
  directory = os.path.dirname(path) or "."
  data = np.ascontiguousarray(embeddings).tobytes()
  header = {"key": key, "shape": list(embeddings.shape), "dtype": str(embeddings.dtype),
            "sha256": hashlib.sha256(data).hexdigest()}
  other = _key_of_file(path)
  if other is not None and other != key:
    _log.warning("RICES: %s holds the embeddings of another key; left as it is, these are not cached", path)
    return
  tmp = None
  try:
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".rices-", suffix=".tmp", dir=directory)
    with os.fdopen(fd, "wb") as f:
      f.write(CACHE_MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    tmp = None
  except OSError as e:
    real = os.path.realpath(directory)
    if real not in _UNWRITABLE_REPORTED:
      _UNWRITABLE_REPORTED.add(real)
      _log.warning("RICES: cannot write the embedding cache in %s (%s); the embeddings are used without caching",
                   directory, e.strerror or e)
  finally:
    if tmp is not None:
      try:
        os.remove(tmp)
      except OSError:
        pass


# ------------------------------------------------------------------------------ towers

def _l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


class _ImageEmbedding(nn.Module):
  """uint8 images [N, S, S, 3] -> Float32[N, E] unit rows: the `vision` tower's pooled
  vector, through `visual_projection` when ``projection_dim`` > 0. The submodule names are
  the contrastive model's, so its parameter tree (or a Flamingo's) applies as it is."""

  config: ViTConfig
  projection_dim: int = 0

  def setup(self):
    self.vision = VisionTransformer(self.config)
    if self.projection_dim:
      self.visual_projection = dense(self.projection_dim, ("embed", None), dtype=self.config.dtype)

  def __call__(self, images: jax.Array) -> jax.Array:
    pooled = self.vision.pooled(normalize_images(images, self.config))
    if self.projection_dim:
      pooled = self.visual_projection(pooled)
    return _l2_normalize(pooled)


def tower_identity(vision: ViTConfig, params: Mapping[str, Any]) -> str:
  """Hex SHA-256 of the tower's config and every parameter (path, shape, dtype, bytes)."""
  h = hashlib.sha256(b"mmjax image tower 1\0" + repr(vision).encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(dict(params))[0]:
    array = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}{array.shape}{array.dtype.str}".encode())
    h.update(array.tobytes())
  return h.hexdigest()


def image_tower(vision: ViTConfig, params: Mapping[str, Any], *, batch_size: int = 64) -> ImageTower:
  """The image tower of a trained model's parameters, for RICES.

  ``params``: a contrastive (CLIP / SigLIP) model's tree, whose embedding is its
  ``encode_image`` (the tower's pooled vector through ``visual_projection`` when the tree
  has one), or a Flamingo's, whose embedding is its ``vision`` tower's pooled vector (the
  post-normed CLS token or the MAP head's output, unprojected); ``vision`` is that model's
  ``config.vision``. Only ``vision`` and ``visual_projection`` are read. The function runs
  jitted on batches padded to ``batch_size`` (one compile for every call).
  """
  if "vision" not in params:
    raise ValueError(f"params has top-level keys {sorted(params)}; expected a 'vision' tower (the parameters of a "
                     "contrastive model, or of a language model that reads images through such a tower)")
  used = {"vision": params["vision"]}
  projection_dim = 0
  if "visual_projection" in params:
    used["visual_projection"] = params["visual_projection"]
    projection_dim = int(np.shape(params["visual_projection"]["kernel"])[-1])
  module = _ImageEmbedding(vision, projection_dim)
  apply = jax.jit(lambda p, images: module.apply({"params": p}, images))

  def embed(images: np.ndarray) -> np.ndarray:
    n = images.shape[0]
    out = []
    for start in range(0, n, batch_size):
      chunk = images[start:start + batch_size]
      pad = batch_size - chunk.shape[0]
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
      out.append(np.asarray(apply(used, chunk))[:batch_size - pad])
    return np.concatenate(out)

  return ImageTower(embed=embed, identity=tower_identity(vision, used))
