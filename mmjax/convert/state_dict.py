"""Reading PyTorch state_dicts: tensors to float32 numpy, and one error for every bad key."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

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
    got = tuple(self.sd[key].shape)
    if got != tuple(shape):
      self.misshaped.append(f"{key}: shape {got}, expected {tuple(shape)}")
      return None
    return to_numpy(self.sd[key])

  def linear(self, key: str, out_features: int, in_features: int) -> np.ndarray | None:
    """torch Linear weight [out, in] -> kernel [in, out]."""
    w = self.get(key, (out_features, in_features))
    return None if w is None else np.ascontiguousarray(w.T)

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
