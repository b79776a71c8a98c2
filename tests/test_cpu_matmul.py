"""benchmarks/cpu_matmul.py (issue 20's minimal reproduction) computes the same block in
JAX and torch, and its flag sweep leaves out a flag set XLA refuses instead of failing."""

import importlib.util
import os
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_matmul.py"


def _module():
  spec = importlib.util.spec_from_file_location("cpu_matmul", _PATH)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_jax_and_torch_blocks_agree():
  if importlib.util.find_spec("torch") is None:  # as the parity tests: required under `make test`
    if os.environ.get("MMJAX_REQUIRE_PARITY") == "1":
      pytest.fail("MMJAX_REQUIRE_PARITY=1 but torch is not installed (the parity extra)")
    pytest.skip("torch is not installed (the parity extra)")
  mod = _module()
  # Loss and the three gradients of the small block, jax-2d against torch, float32.
  assert mod.check_same((2, 8, 16, 32)) < 1e-5


def test_sweep_leaves_out_a_refused_flag(capsys):
  mod = _module()
  args = type("A", (), dict(shapes=["small"], flags="--xla_cpu_no_such_flag=1", iters=1, rounds=1))()
  results = mod.sweep(args)
  assert results["refused"] == ["--xla_cpu_no_such_flag=1"]
  assert set(results["small"]) == {"(default)"}
  assert "did not start" in capsys.readouterr().out
