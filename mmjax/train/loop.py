"""The training loop: stages, checkpoints, metrics, preemption, divergence.

`train(config, workdir, task)` runs `config.train.num_steps` updates into `workdir`,
resuming from the newest complete checkpoint there. A `Task` says what is trained (a
model's init/apply and parameter labels) on what data (an iterator with
`get_state()/set_state()`); `mmjax.train.task.flamingo_task(config)` is the real one, the
tests use a tiny stand-in. Per step the loop only dispatches: the metrics of the previous
step are fetched after the next one is queued, so the host never waits on the device
except at checkpoints and evaluations.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.train import checkpoint as checkpoint_lib
from mmjax.train import config as config_lib
from mmjax.train import flops as flops_lib
from mmjax.train import metrics as metrics_lib
from mmjax.train import optimizer as optimizer_lib
from mmjax.train import state as state_lib
from mmjax.train import step as step_lib

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
  """The loss or gradient norm was not finite (and `train.nan_policy == 'stop'`)."""


@dataclasses.dataclass
class Task:
  """What is trained on what: the loop's only view of the model and the data."""
  # (rng key) -> params
  init_params: Callable[[jax.Array], Any]
  # (params, batch, rng) -> logits [B, T, V]
  apply_fn: step_lib.ApplyFn
  # params -> pytree of 'vision' | 'resampler' | 'xattn' | 'lm'
  param_labels: Callable[[Any], Any]
  # () -> iterator of numpy batches with get_state()/set_state()
  train_data: Callable[[], Iterator[dict]]
  # () -> finite iterable of validation batches, or None
  val_data: Callable[[], Iterable[dict]] | None = None
  # trainable components -> matmul FLOPs of one example's train step, or None (no MFU)
  flops_per_example: Callable[[frozenset], float] | None = None


def blank_images(batch: dict) -> dict:
  """The ablation: every image replaced by black pixels (the text, <image> tokens included, stays)."""
  out = dict(batch)
  out["images"] = np.zeros_like(np.asarray(batch["images"]))
  return out


def prepare_batch(config: ml_collections.ConfigDict, batch: dict) -> dict:
  return blank_images(batch) if bool(config.data.blank_images) else batch


def evaluate_loss(eval_step, params, batches: Iterable[dict], config, max_batches: int = 0) -> float:
  """Token-weighted mean validation loss over (at most `max_batches` of) `batches`."""
  total, count = 0.0, 0.0
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    t, c = jax.device_get(eval_step(params, prepare_batch(config, batch)))
    total += float(t)
    count += float(c)
  return total / max(count, 1.0)


class _Preemption:
  """Turns SIGTERM into a flag the loop checks once per step."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, as in a notebook thread
      self._old = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _fmt_policy(config) -> str:
  policy = str(config.train.nan_policy)
  if policy not in ("stop", "skip"):
    raise ValueError(f"train.nan_policy={policy!r}; expected 'stop' or 'skip'")
  return policy


def train(config: ml_collections.ConfigDict, workdir: str, task: Task) -> dict:
  """Trains into `workdir` (resuming there if it holds checkpoints); returns a summary dict.

  Summary keys: `start_step` (where this run began), `step` (where it stopped),
  `preempted` (SIGTERM), `last_loss`, `val_loss` (if evaluated).
  """
  policy = _fmt_policy(config)
  num_steps = int(config.train.num_steps)
  config_lib.write_resolved(config, workdir)
  stages = optimizer_lib.parse_stages(str(config.freeze.stages))
  schedule = optimizer_lib.make_schedule(config)
  seed = int(config.seed)
  init_key = jax.random.key(seed)
  abstract_params = jax.eval_shape(task.init_params, init_key)
  labels = task.param_labels(abstract_params)
  masks = [optimizer_lib.trainable_mask(labels, s.trainable) for s in stages]
  txs = [optimizer_lib.make_transform(config, m) for m in masks]
  on_cpu = jax.devices()[0].platform == "cpu"

  def build_step(i):
    fn = step_lib.make_train_step(apply_fn=task.apply_fn, tx=txs[i], mask=masks[i], schedule=schedule,
                                  grad_accum_steps=int(config.optimizer.grad_accum_steps),
                                  remat=str(config.train.remat))
    # Donation saves a copy of the state on accelerators; on CPU it buys nothing and
    # would race with an asynchronous checkpoint reading the previous state.
    return jax.jit(fn, donate_argnums=() if on_cpu else (0,))

  def template(step):
    i = optimizer_lib.stage_index(stages, max(step - 1, 0))
    return jax.eval_shape(lambda: state_lib.create(task.init_params(init_key), txs[i], seed, step))

  ckpt = checkpoint_lib.Checkpointer(workdir, config)
  writer = metrics_lib.MetricWriter(workdir, tensorboard=bool(config.log.tensorboard), progress_total=num_steps,
                                    print_every=int(config.log.get("print_every", 50)))
  data = task.train_data()
  restored = ckpt.restore_latest(template)
  if restored is not None:
    step, state, data_state = restored
    data.set_state(data_state)
    opt_stage = optimizer_lib.stage_index(stages, max(step - 1, 0))
    log.info("resumed from step %d", step)
  else:
    step = 0
    # jit(init_params) alone, so that `jax.jit(task.init_params)(key)` reproduces these
    # parameters bitwise (fusing init into a bigger program can move the last ulp).
    state = state_lib.create(jax.jit(task.init_params)(init_key), txs[0], seed)
    opt_stage = 0
  start_step = step
  eval_step = jax.jit(step_lib.make_eval_step(task.apply_fn))
  flops = {}
  peak = flops_lib.peak_flops_per_device(float(config.log.peak_tflops))
  n_dev = jax.device_count()
  summary = {"start_step": start_step, "step": step, "preempted": False, "last_loss": None}
  pending = None  # (step, metrics on device, batch stats) of the step dispatched last
  last_done = time.perf_counter()
  cur_stage, step_fn = None, None
  skipped = 0

  def flush(pending):
    nonlocal last_done, skipped
    s, m, ntok, nimg, stage_i = pending
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    now = time.perf_counter()
    dt = now - last_done
    last_done = now
    m["step_time"] = dt
    m["tokens_per_s"] = ntok / dt
    m["images_per_s"] = nimg / dt
    if task.flops_per_example is not None and peak:
      if stage_i not in flops:
        flops[stage_i] = task.flops_per_example(stages[stage_i].trainable)
      m["mfu"] = flops[stage_i] * bsz / dt / (peak * n_dev)
    writer.write(s, "train", m)
    writer.progress(s, m)
    summary["last_loss"] = m["loss"]
    if m["finite"] < 1.0:
      done = ckpt.steps()
      where = f"checkpoint step {done[-1]}" if done else "no checkpoint (restart from scratch)"
      if policy == "stop":
        raise TrainingDiverged(
            f"loss={m['loss']} grad_norm={m['grad_norm']} at step {s}; the update was not applied. "
            f"Resume from {where} in {ckpt.directory} by rerunning the same command "
            f"(lower --config.optimizer.lr or set --config.train.nan_policy=skip)")
      skipped += 1
      log.warning("step %d: loss=%s grad_norm=%s is not finite; update skipped (%d so far)",
                  s, m["loss"], m["grad_norm"], skipped)

  bsz = 0
  try:
    with _Preemption() as preempt:
      while step < num_steps:
        si = optimizer_lib.stage_index(stages, step)
        if si != cur_stage:
          cur_stage, step_fn = si, build_step(si)
          if opt_stage != si:
            # A new stage: a new set of trainable leaves, a fresh optimizer state for them.
            state = state.replace(opt_state=txs[si].init(state.params))
            opt_stage = si
        batch = prepare_batch(config, next(data))
        data_state = data.get_state()
        bsz = int(batch["input_ids"].shape[0])
        ntok = float(np.prod(batch["input_ids"].shape))
        nimg = float(np.sum(batch["image_mask"]))
        state, metrics = step_fn(state, batch)
        if pending is not None:
          flush(pending)
        pending = (step, metrics, ntok, nimg, si)
        step += 1
        summary["step"] = step
        ckpt.save(step, state, data_state, config)
        every = int(config.eval.every_steps)
        if task.val_data is not None and every > 0 and step % every == 0:
          flush(pending)
          pending = None
          val = evaluate_loss(eval_step, state.params, task.val_data(), config, int(config.eval.num_batches))
          writer.write(step, "eval", {"val_loss": val})
          summary["val_loss"] = val
          ckpt.save_best(step, state, data_state, config, val)
          last_done = time.perf_counter()
        if preempt.requested:
          flush(pending)
          pending = None
          log.warning("SIGTERM: saving step %d and exiting", step)
          ckpt.save(step, state, data_state, config, force=True)
          summary["preempted"] = True
          break
      if pending is not None:
        flush(pending)
        pending = None
      if not summary["preempted"] and step == num_steps:
        ckpt.save(step, state, data.get_state(), config, force=True)
  finally:
    ckpt.close()
    writer.close()
  summary["state"] = state
  return summary


def restore_params(config: ml_collections.ConfigDict, workdir: str, task: Task):
  """(step, params) of the newest complete checkpoint in `workdir` (for eval and generate)."""
  stages = optimizer_lib.parse_stages(str(config.freeze.stages))
  labels = task.param_labels(jax.eval_shape(task.init_params, jax.random.key(int(config.seed))))
  txs = [optimizer_lib.make_transform(config, optimizer_lib.trainable_mask(labels, s.trainable)) for s in stages]

  def template(step):
    i = optimizer_lib.stage_index(stages, max(step - 1, 0))
    return jax.eval_shape(lambda: state_lib.create(task.init_params(jax.random.key(int(config.seed))), txs[i],
                                                   int(config.seed), step))

  ckpt = checkpoint_lib.Checkpointer(workdir, config)
  try:
    restored = ckpt.restore_latest(template)
  finally:
    ckpt.close()
  if restored is None:
    raise ValueError(f"{workdir!r} holds no complete checkpoint; run `mmjax train --workdir {workdir}` first")
  return restored[0], restored[1].params


def loss_is_finite(x: float) -> bool:
  return math.isfinite(x)
