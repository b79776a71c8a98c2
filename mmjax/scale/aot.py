"""Compile the full Flamingo train step ahead of time for a TPU topology, on a CPU host.

`compile_step(config, topology=..., mesh=..., rules=...)` builds the model from
`config.model`, the trainer's optimizer (frozen components carry no state) and
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
import types
from typing import Any

import jax
import jax.numpy as jnp
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
  flops_per_chip: float      # XLA's cost analysis of the per-chip program (see scan_flops_correction)
  compile_s: float
  # What scan_flops_correction added to XLA's count (0 without scanned layers).
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


def model_config(config: ml_collections.ConfigDict):
  """The FlamingoConfig of `config.model`, as the trainer builds it (no tokenizer needed)."""
  from mmjax.train import task
  m = config.model
  vocab = types.SimpleNamespace(vocab_size=int(m.decoder.vocab_size), image_id=int(m.media_token_id),
                                end_of_chunk_id=int(m.end_of_chunk_token_id))
  return task.model_config(config, vocab)


def abstract_batch(cfg, batch: int, length: int, num_images: int) -> dict:
  s = cfg.vision.image_size
  sds = jax.ShapeDtypeStruct
  return {"images": sds((batch, num_images, s, s, 3), jnp.uint8), "image_mask": sds((batch, num_images), jnp.bool_),
          "input_ids": sds((batch, length), jnp.int32), "image_index": sds((batch, length), jnp.int32),
          "targets": sds((batch, length), jnp.int32), "loss_mask": sds((batch, length), jnp.float32)}


def build_step(config: ml_collections.ConfigDict, mesh, rules: sh.Rules, *, trainable: frozenset[str],
               batch: int, length: int, num_images: int, frozen_rules: sh.Rules | None = None):
  """(ShardedStep, abstract state with shardings, abstract batch with shardings)."""
  from mmjax.models import flamingo
  from mmjax.train import optimizer, state as state_lib, step as step_lib, task
  cfg = model_config(config)
  absb = abstract_batch(cfg, batch, length, num_images)
  one = {k: jnp.zeros((1,) + v.shape[1:], v.dtype) for k, v in absb.items()}
  model = task.Model(cfg, one)
  boxed = jax.eval_shape(lambda k: flamingo.Flamingo(cfg).init(
      k, one["images"], one["input_ids"], one["image_index"], one["image_mask"]), jax.random.key(0))["params"]
  params = jax.eval_shape(model.init, jax.random.key(0))
  mask = optimizer.trainable_mask(flamingo.param_labels(params), trainable)
  tx = optimizer.make_transform(config, mask)
  abstract_state = jax.eval_shape(lambda p: state_lib.create(p, tx, seed=0), params)
  train_step = step_lib.make_train_step(
      apply_fn=model.apply, tx=tx, mask=mask, schedule=optimizer.make_schedule(config),
      grad_accum_steps=int(config.optimizer.get("grad_accum_steps", 1)),
      remat=str(config.train.remat) if str(config.train.remat) in step_lib.REMAT_POLICIES else "none")
  from mmjax.train.sharded_step import shard_train_step
  step = shard_train_step(train_step, abstract_state, absb, boxed, mesh, rules, trainable=mask,
                          frozen_rules=frozen_rules)
  with_sharding = lambda tree, shardings: jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
  return step, with_sharding(abstract_state, step.state_shardings), with_sharding(absb, step.batch_shardings)


def scan_flops_correction(config: ml_collections.ConfigDict, *, trainable: frozenset[str], batch: int,
                          length: int, num_images: int, chips: int) -> float:
  """FLOPs per chip that XLA's cost analysis misses with ``scan_layers``.

  XLA counts a while loop's body once, whatever its trip count, so a scanned decoder's
  G blocks are counted as one. This returns (G - 1) x one block's train-step matmul
  FLOPs (``mmjax.train.flops``: forward x1, input gradient x1, weight gradient x1 when
  trainable, recomputation x1 for rematerialised LM layers; causal attention counted
  half) / chips. Checked against an unscanned
  compile: OpenFlamingo-3B on v5e:2x2, 13.71 (scanned + this) vs 13.48 TFLOP/chip.
  """
  from mmjax.models.decoder import scan_plan
  from mmjax.train import flops
  cfg = model_config(config)
  d = cfg.decoder
  if not d.scan_layers:
    return 0.0
  plan = scan_plan(d)
  if plan.num_blocks < 2:
    return 0.0
  fwd = flops.flamingo_forward_flops(cfg, num_images, length)
  lm = fwd["lm"][0]
  # Every scanned block but (at most) the first lies above a trainable parameter (the
  # resampler or a cross-attention), so gradients pass through all repeated blocks.
  lm_mult = (3 if "lm" in trainable else 2) + (1 if d.remat else 0)
  block = plan.block_size * lm_mult * lm
  if plan.with_xattn:
    block += (3 if "xattn" in trainable else 2) * fwd["xattn"][0]
  return (plan.num_blocks - 1) * block * batch / chips


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
  added = scan_flops_correction(config, trainable=trainable, batch=batch, length=length,
                                num_images=num_images, chips=len(devices))
  return Fit(**sized, temp_bytes=temp, total_bytes=int(total),
             flops_per_chip=float(cost.get("flops", 0.0)) + added, compile_s=elapsed, scan_flops_added=added)
