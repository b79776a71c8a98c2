"""Reading PyTorch state_dicts: tensors to float32 numpy, one error for every bad key, and a
state_dict read lazily from checkpoint files (``LazyStateDict``: one tensor in memory at a
time, from ``.safetensors`` files or ``torch.load(weights_only=True, mmap=True)`` files)."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np


def to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (any float dtype, any device) or array-like -> float32 numpy array."""
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
      value = value.float()
    value = value.numpy()
  return np.asarray(value, dtype=np.float32)


class StateDictReader:
  """Reads keys of a state_dict, collecting missing and mis-shaped ones for one error.

  ``used`` records every key read, so a caller can report the keys nobody claimed.
  """

  def __init__(self, sd: Mapping[str, Any], what: str):
    self.sd = sd
    self.what = what
    self.used: set[str] = set()
    self.missing: list[str] = []
    self.misshaped: list[str] = []

  def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
    if key not in self.sd:
      self.missing.append(key)
      return None
    self.used.add(key)
    value = self.sd[key]  # once: a LazyStateDict reads the file at each indexing
    got = tuple(value.shape)
    if got != tuple(shape):
      self.misshaped.append(f"{key}: shape {got}, expected {tuple(shape)}")
      return None
    return to_numpy(value)

  def linear(self, key: str, out_features: int, in_features: int) -> np.ndarray | None:
    """torch Linear weight [out, in] -> kernel [in, out]."""
    w = self.get(key, (out_features, in_features))
    return None if w is None else np.ascontiguousarray(w.T)

  def tied_head(self, key: str, embedding: np.ndarray | None) -> None:
    """An output head ``key`` of a model whose config ties it to ``embedding``: absent, or (as
    torch's ``state_dict()`` lists the shared tensor under both names) equal to the table."""
    if key not in self.sd:
      return
    self.used.add(key)
    head = to_numpy(self.sd[key])
    if embedding is not None and (head.shape != embedding.shape or not np.array_equal(head, embedding)):
      self.misshaped.append(f"{key}: differs from the embedding table, but the config ties them"
                            " (tie_embeddings=True); expected no lm_head or the same tensor")

  def layer_norm(self, prefix: str, dim: int) -> dict:
    """torch LayerNorm ``{prefix}weight``, ``{prefix}bias`` -> {"scale", "bias"}."""
    return {"scale": self.get(prefix + "weight", (dim,)), "bias": self.get(prefix + "bias", (dim,))}

  def raise_if_errors(self, unexpected: Iterable[str] = ()) -> None:
    unexpected = sorted(unexpected)
    if not (self.missing or self.misshaped or unexpected):
      return
    lines = [f"cannot convert {self.what}:"]
    if self.missing:
      lines.append(f"  missing keys ({len(self.missing)}): " + ", ".join(self.missing))
    if unexpected:
      lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    if self.misshaped:
      lines.append(f"  mis-shaped keys ({len(self.misshaped)}): " + "; ".join(self.misshaped))
    raise ValueError("\n".join(lines))


# ------------------------------------------------------------------------- lazy files


class TensorFile(Protocol):
  """One checkpoint file: its tensors' shapes (known without reading them) and a reader."""
  path: str
  shapes: dict[str, tuple[int, ...]]

  def read(self, key: str) -> np.ndarray:
    """The tensor ``key`` as a numpy array that owns its memory."""


def _safetensors_dtypes() -> dict[str, np.dtype]:
  import ml_dtypes  # ships with jax; numpy has no bfloat16
  names = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
  return {name: np.dtype(dtype) for name, dtype in names.items()}


class SafetensorsFile:
  """A ``.safetensors`` file, its header parsed once; ``read`` copies one tensor's bytes.

  Reading with ``np.fromfile`` at the tensor's offset (not ``safe_open``): ``safe_open``
  maps the whole file, and every page a read touches stays in the process's resident set
  until the file is closed, so reading a model through one handle counts the model twice;
  and its numpy reader refuses bfloat16.
  """

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      (n,) = struct.unpack("<Q", head) if len(head) == 8 else (-1,)
      if not 0 < n <= size - 8:
        raise ValueError(f"{path}: not a safetensors file (header length {n}, file size {size})")
      try:
        header = json.loads(f.read(n))
      except ValueError as err:
        raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {err})") from None
    header.pop("__metadata__", None)
    dtypes = _safetensors_dtypes()
    self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    for key, info in header.items():
      if info["dtype"] not in dtypes:
        raise ValueError(f"{path}: tensor {key!r} has dtype {info['dtype']}; expected one of {sorted(dtypes)}")
      dtype, shape = dtypes[info["dtype"]], tuple(info["shape"])
      start, end = info["data_offsets"]
      if end - start != dtype.itemsize * int(np.prod(shape)) or 8 + n + end > size:
        raise ValueError(f"{path}: tensor {key!r} ({info['dtype']} {list(shape)}) has bytes {start}..{end} of "
                         f"{size - 8 - n}: the file is truncated or corrupt")
      self._entries[key] = (dtype, shape, 8 + n + start)
      self.shapes[key] = shape

  def read(self, key: str) -> np.ndarray:
    dtype, shape, offset = self._entries[key]
    count = int(np.prod(shape))
    return np.fromfile(self.path, dtype=dtype, count=count, offset=offset).reshape(shape)


class TorchFile:
  """A ``torch.save`` file (``pytorch_model.bin``), opened only as
  ``torch.load(weights_only=True, mmap=True)``: a pickle that names anything but tensors and
  plain containers is refused (a ValueError naming the file), never executed.

  ``read`` loads the file again and copies one tensor off the mapping, which is then closed:
  a mapping kept open would keep every page read so far resident.
  """

  def __init__(self, path: str):
    self.path = path
    self.shapes = {key: tuple(t.shape) for key, t in self._load().items()}

  def _load(self) -> dict:
    import pickle  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top  (only .bin checkpoints need torch)
    try:
      sd = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as err:
      lines = str(err).splitlines() or [""]
      # torch's message is a page of advice; the line naming the refused global is the news.
      why = next((line.strip() for line in lines if "WeightsUnpickler error" in line), lines[0])
      raise ValueError(f"{self.path}: refused: torch.load(weights_only=True, mmap=True) cannot read it "
                       f"(a pickle of something other than tensors, or not a zip-format torch.save file): "
                       f"{type(err).__name__}: {why}") from None
    if not isinstance(sd, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in sd.items()):
      raise ValueError(f"{self.path}: holds a {type(sd).__name__}, not a state_dict of tensors")
    return sd

  def read(self, key: str) -> np.ndarray:
    tensor = self._load()[key]
    if str(tensor.dtype) == "torch.bfloat16":
      return tensor.float().numpy()  # numpy has no bfloat16; to_numpy would widen it anyway
    return tensor.numpy().copy()  # off the file mapping, which closes with the loaded dict


class LazyStateDict(Mapping):
  """A state_dict over checkpoint files: ``sd[key]`` reads that one tensor from its file.

  Membership, iteration and ``shape(key)`` read no tensor data. Nothing is cached, so a
  converter that reads each key once holds at most the tensors it is working on.
  """

  def __init__(self, files: Iterable[TensorFile]):
    self._file_of: dict[str, TensorFile] = {}
    for f in files:
      for key in f.shapes:
        if key in self._file_of:
          raise ValueError(f"tensor {key!r} is in both {self._file_of[key].path} and {f.path}")
        self._file_of[key] = f

  def __getitem__(self, key: str) -> np.ndarray:
    return self._file_of[key].read(key)

  def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
    return key in self._file_of

  def __iter__(self) -> Iterator[str]:
    return iter(self._file_of)

  def __len__(self) -> int:
    return len(self._file_of)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._file_of[key].shapes[key]

  def path(self, key: str) -> str:
    return self._file_of[key].path
