"""Compile the full train step ahead of time for a TPU topology, on a CPU host.

`compile_step(config, topology=..., mesh=..., rules=...)` builds the model of the
config's family (`config.model.family`, `Family.abstract`), the trainer's optimizer (frozen components carry no state) and
`make_train_step`, shards it with `mmjax.train.sharded_step.shard_train_step` over a mesh of the
topology's devices (libtpu, `jax.experimental.topologies`), lowers and compiles it for
real TPU, and returns a `Fit`: per-chip bytes of parameters, optimizer state and
temporaries against the chip's HBM, and the step's FLOPs. Nothing is allocated: every
array is a `jax.ShapeDtypeStruct`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from mmjax import sharding as sh

# HBM per chip, bytes (Cloud TPU docs).
HBM_BYTES = {"v4": 32 << 30, "v5e": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30, "tpu7x": 192 << 30}
# bf16 dense peak per chip, FLOP/s (Cloud TPU docs).
PEAK_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12, "tpu7x": 2307e12}


@dataclasses.dataclass(frozen=True)
class Fit:
  """Per-chip memory of one compiled train step."""
  topology: str
  slices: int
  chips: int
  mesh: dict
  rules: str
  batch: int
  length: int
  num_images: int
  param_bytes: int           # parameters on one chip (their shards)
  opt_bytes: int             # optimizer state on one chip
  temp_bytes: int            # peak minus arguments: activations, gathered weights, gradients
  total_bytes: int           # XLA's peak: arguments + temporaries + non-aliased outputs
  hbm_bytes: int
  flops_per_chip: float      # XLA's cost analysis of the per-chip program (see uncounted_flops)
  compile_s: float
  # What uncounted_flops added to XLA's count (0 without scanned layers).
  scan_flops_added: float = 0.0

  @property
  def fits(self) -> bool | None:
    """None when not compiled (`--no-compile`: only the sharded state was sized)."""
    if self.total_bytes < 0:
      return None
    return self.total_bytes <= self.hbm_bytes

  def row(self) -> str:
    gib = lambda b: f"{human(b) if b >= 0 else '-':>8}"
    fits = {True: "yes", False: "NO ", None: "-"}[self.fits]
    tflops = f"{self.flops_per_chip / 1e12:.2f}" if self.flops_per_chip >= 0 else "-"
    mesh = "x".join(str(self.mesh[a]) for a in sh.MESH_AXES)
    return (f"{self.topology:<12}{self.slices:>3}{self.chips:>6}  {mesh:<10}{self.rules:<14}"
            f"{gib(self.param_bytes)}{gib(self.opt_bytes)}{gib(self.temp_bytes)}{gib(self.total_bytes)}"
            f"{gib(self.hbm_bytes)}  {fits:<4}{tflops:>10}"
            f"{self.compile_s:8.1f}")


HEADER = (f"{'topology':<12}{'sl':>3}{'chips':>6}  {'mesh':<10}{'rules':<14}{'params':>8}{'opt':>8}"
          f"{'temp':>8}{'total':>8}{'HBM':>8}  {'fits':<4}{'TFLOP/chip':>10}{'compile':>8}\n"
          f"{'':<12}{'':>3}{'':>6}  {'dcn.d.f.t':<10}{'':<14}{'(per chip, bytes: K/M/G = 2^10/2^20/2^30)':<40}")


def human(b: float) -> str:
  """Bytes as '1.23G', '456M', '12.0K'."""
  for unit, scale in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
    if b >= scale:
      return f"{b / scale:.3g}{unit}" if b / scale < 100 else f"{b / scale:.0f}{unit}"
  return f"{int(b)}B"


def generation(topology: str) -> str:
  """'v5p' from 'v5p:4x4x4'."""
  gen = topology.split(":")[0].lower()
  if gen not in HBM_BYTES:
    raise ValueError(f"topology {topology!r}: generation {gen!r} is not one of {sorted(HBM_BYTES)}")
  return gen


def topology_devices(topology: str, slices: int = 1) -> list:
  """The devices of a TPU topology (CPU host + libtpu), e.g. 'v5e:2x2', 'v5p:2x2x2'."""
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  # Compiling needs no chip: let several processes (tests, a sweep beside training) load libtpu.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  generation(topology)
  kwargs = {"num_slices": slices} if slices > 1 else {}
  try:
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs)
  except Exception as e:  # libtpu raises its own error types
    raise ValueError(f"topology {topology!r} (slices={slices}) is not known to libtpu: {e}") from None
  return list(desc.devices)


def build_step(config: ml_collections.ConfigDict, mesh, rules: sh.Rules, *, trainable: frozenset[str],
               batch: int, length: int, num_images: int, frozen_rules: sh.Rules | None = None):
  """(ShardedStep, abstract state with shardings, abstract batch with shardings) of the
  train step of `config`'s model family (`Family.abstract`: no data, no tokenizer)."""
  from mmjax import families
  from mmjax.train import optimizer, state as state_lib, step as step_lib
  from mmjax.train.sharded_step import shard_train_step
  model = families.of_config(config).abstract(config)
  absb = model.abstract_batch(batch, length, num_images)
  boxed = model.boxed_params(jax.random.key(0))
  params = jax.eval_shape(model.init_params, jax.random.key(0))
  mask = optimizer.trainable_mask(model.param_labels(params), trainable)
  tx = optimizer.make_transform(config, mask)
  abstract_state = jax.eval_shape(lambda p: state_lib.create(p, tx, seed=0), params)
  train_step = step_lib.make_train_step(
      apply_fn=model.apply_fn, loss_fn=model.loss_fn, param_metrics=model.param_metrics, tx=tx, mask=mask,
      schedule=optimizer.make_schedule(config),
      grad_accum_steps=int(config.optimizer.get("grad_accum_steps", 1)),
      remat=str(config.train.remat) if str(config.train.remat) in step_lib.REMAT_POLICIES else "none")
  step = shard_train_step(train_step, abstract_state, absb, boxed, mesh, rules, trainable=mask,
                          frozen_rules=frozen_rules)
  with_sharding = lambda tree, shardings: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
  return step, with_sharding(abstract_state, step.state_shardings), with_sharding(absb, step.batch_shardings)


def uncounted_flops(config: ml_collections.ConfigDict, *, trainable: frozenset[str], batch: int, length: int,
                    num_images: int, chips: int) -> float:
  """FLOPs per chip that XLA's cost analysis misses (`AbstractModel.uncounted_flops`: a
  scanned decoder's loop body is counted once); 0 for a family that misses none."""
  from mmjax import families
  model = families.of_config(config).abstract(config)
  if model.uncounted_flops is None:
    return 0.0
  return model.uncounted_flops(trainable, batch, length, num_images, chips)


def _shard_bytes(tree) -> int:
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def compile_step(config: ml_collections.ConfigDict, *, topology: str, mesh: dict, rules: str,
                 trainable: frozenset[str], batch: int, length: int, num_images: int, slices: int = 1,
                 frozen_rules: str | None = None, compile: bool = True) -> Fit:
  """Compiles the train step for `topology` and measures it (see the module docstring).

  With ``compile=False`` only the sharded parameters and optimizer state are sized
  (seconds instead of minutes); temporaries, peak and FLOPs are then reported as -1.
  """
  devices = topology_devices(topology, slices)
  the_mesh = sh.make_mesh({**mesh, "slices": slices}, devices)
  start = time.perf_counter()
  step, state, batch_sds = build_step(
      config, the_mesh, sh.get_rules(rules), trainable=trainable, batch=batch, length=length,
      num_images=num_images, frozen_rules=None if frozen_rules is None else sh.get_rules(frozen_rules))
  name = rules if frozen_rules is None else f"{rules}+{frozen_rules}"
  sized = dict(topology=topology, slices=slices, chips=len(devices), mesh=dict(the_mesh.shape), rules=name,
               batch=batch, length=length, num_images=num_images, param_bytes=_shard_bytes(state.params),
               opt_bytes=_shard_bytes(state.opt_state), hbm_bytes=HBM_BYTES[generation(topology)])
  if not compile:
    return Fit(**sized, temp_bytes=-1, total_bytes=-1, flops_per_chip=-1.0,
               compile_s=time.perf_counter() - start)
  compiled = step.lower(state, batch_sds).compile()
  elapsed = time.perf_counter() - start
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # On TPU the buffer assignment reports its peak (arguments included, donated outputs
  # aliased) and leaves temp_size at 0; elsewhere add the parts up.
  live = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes)
  total = max(int(getattr(mem, "peak_memory_in_bytes", 0) or 0), live)
  temp = max(int(mem.temp_size_in_bytes), total - int(mem.argument_size_in_bytes))
  added = uncounted_flops(config, trainable=trainable, batch=batch, length=length, num_images=num_images,
                          chips=len(devices))
  return Fit(**sized, temp_bytes=temp, total_bytes=int(total),
             flops_per_chip=float(cost.get("flops", 0.0)) + added, compile_s=elapsed, scan_flops_added=added)
