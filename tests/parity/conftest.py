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

Without the parity extra (the Python 3.12 leg: torch for cp312 is only the large CUDA build) the
test modules here are reported as skipped, naming what is missing, instead of failing to import
torch at collection. `make test` installs the extra and sets MMJAX_REQUIRE_PARITY=1: there a
missing package is a collection error, so the parity tests cannot silently stop running.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
  import torch

# What the parity tests import beyond mmjax's own dependencies: the `parity` extra's packages
# (as module names), and open-flamingo, installed apart with --no-deps.
PARITY_MODULES = ("torch", "transformers", "einops", "einops_exts", "safetensors", "open_flamingo")
PARITY_INSTALL = ("pip install -e '.[parity]' && pip install --no-deps open-flamingo==2.0.1"
                  " (or `make install`, Python 3.11)")


def missing_parity_modules() -> list[str]:
  """The modules of PARITY_MODULES that cannot be found (without importing any of them)."""
  return [name for name in PARITY_MODULES if importlib.util.find_spec(name) is None]


class _SkippedParityModule(pytest.Module):
  """A test module that is reported as skipped instead of being imported."""

  skip_reason = ""

  def collect(self):
    pytest.skip(self.skip_reason)


def pytest_pycollect_makemodule(module_path, parent):
  """Skips every test module here, with the reason, when the parity packages are missing."""
  missing = missing_parity_modules()
  if not missing or os.environ.get("MMJAX_REQUIRE_PARITY") == "1":
    return None  # pytest's own collection: imports the module (and fails loudly if required)
  module = _SkippedParityModule.from_parent(parent, path=module_path)
  module.skip_reason = (f"{module_path.name} needs {', '.join(missing)}, not installed: "
                        f"install the parity extra: {PARITY_INSTALL}")
  return module


def install_open_clip_stub() -> None:
  """Puts a stub `open_clip` in sys.modules unless a working one is already imported (the
  benchmark's own: `mmjax.families.flamingo.original`)."""
  from mmjax.families.flamingo import original  # pylint: disable=g-import-not-at-top
  original.install_open_clip_stub()


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
  import torch

  torch.manual_seed(seed)
  return seed


def to_numpy(x: Any) -> Any:
  """torch tensors (also nested in dicts/lists/tuples) -> float32/int numpy arrays, detached."""
  import torch

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
