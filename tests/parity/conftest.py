"""Shared helpers for parity tests against the PyTorch originals.

`open_flamingo/__init__.py` imports `open_clip`, which needs torchvision (not importable beside
the pinned torch). The OpenFlamingo reference modules we compare against never touch it, so a stub
module is put in `sys.modules['open_clip']` before `open_flamingo.src.*` is imported.

Use from a test module:

  from tests.parity.conftest import import_open_flamingo, to_numpy, seed_torch

  of = import_open_flamingo()          # namespace: helpers, flamingo, flamingo_lm, utils
  block = of.helpers.GatedCrossAttentionBlock(dim=32, dim_visual=16)

or through the fixtures `open_flamingo` (the same namespace), `torch_seed` (seeds torch with 0
and returns the seed) and `to_np` (the `to_numpy` function).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

import numpy as np
import pytest

# The parity extra is installed by `make test`: a missing torch is an error, not a skip.
import torch


def install_open_clip_stub() -> None:
  """Puts a stub `open_clip` in sys.modules unless a working one is already imported."""
  if "open_clip" in sys.modules:
    return
  stub = types.ModuleType("open_clip")
  stub.__doc__ = "Stub installed by tests/parity/conftest.py: open_flamingo's reference modules do not use it."

  def _unavailable(*args, **kwargs):
    raise RuntimeError("open_clip is stubbed out in the parity tests; build vision towers locally.")

  stub.create_model_and_transforms = _unavailable
  stub.get_tokenizer = _unavailable
  sys.modules["open_clip"] = stub


def import_open_flamingo() -> types.SimpleNamespace:
  """Imports the OpenFlamingo reference modules (helpers, flamingo, flamingo_lm, utils)."""
  install_open_clip_stub()
  return types.SimpleNamespace(
      helpers=importlib.import_module("open_flamingo.src.helpers"),
      flamingo=importlib.import_module("open_flamingo.src.flamingo"),
      flamingo_lm=importlib.import_module("open_flamingo.src.flamingo_lm"),
      utils=importlib.import_module("open_flamingo.src.utils"),
  )


def seed_torch(seed: int = 0) -> int:
  """Seeds torch's global generator (reference models draw random weights from it)."""
  torch.manual_seed(seed)
  return seed


def to_numpy(x: Any) -> Any:
  """torch tensors (also nested in dicts/lists/tuples) -> float32/int numpy arrays, detached."""
  if isinstance(x, torch.Tensor):
    x = x.detach().cpu()
    if x.dtype in (torch.bfloat16, torch.float16):
      x = x.float()
    return x.numpy()
  if isinstance(x, dict):
    return {k: to_numpy(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return type(x)(to_numpy(v) for v in x)
  return np.asarray(x)


def state_dict_to_numpy(module: "torch.nn.Module") -> dict[str, np.ndarray]:
  """A torch module's state_dict as numpy arrays (the converters accept either)."""
  return {k: to_numpy(v) for k, v in module.state_dict().items()}


@pytest.fixture(scope="session")
def open_flamingo() -> types.SimpleNamespace:
  return import_open_flamingo()


@pytest.fixture
def torch_seed() -> int:
  return seed_torch(0)


@pytest.fixture(scope="session")
def to_np():
  return to_numpy
