"""The training loop: stages, checkpoints, metrics, preemption, divergence.

`train(config, workdir, task)` runs `config.train.num_steps` updates into `workdir`,
resuming from the newest complete checkpoint there. A `Task` says what is trained (a
model's init/apply and parameter labels) on what data (an iterator with
`get_state()/set_state()`); `mmjax.families.of_config(config).task(config, workdir)` is the real one, the
tests use a tiny stand-in. Per step the loop only dispatches: the metrics of the previous
step are fetched after the next one is queued, so the host never waits on the device
except at checkpoints and evaluations.

Every run is a sharded run: the step is jitted over the config's device mesh
(`config.mesh`, `config.sharding`; `mmjax.train.sharded_step`), with the state created, restored
and stored with the shardings its rules give, and each batch assembled from the rows of
every JAX process. One CPU is a 1-device mesh; several processes (`mmjax launch local`,
a TPU pod) run the same code, each feeding its own rows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from mmjax import families
from mmjax import sharding as sh
from mmjax.errors import MmjaxError
from mmjax.families.base import Task
from mmjax.train import sharded_step
from mmjax.train import checkpoint as checkpoint_lib
from mmjax.train import config as config_lib
from mmjax.train import flops as flops_lib
from mmjax.train import metrics as metrics_lib
from mmjax.train import optimizer as optimizer_lib
from mmjax.train import state as state_lib
from mmjax.train import step as step_lib
from mmjax.train import workdir as workdir_lib

log = logging.getLogger(__name__)


class TrainingDiverged(MmjaxError, RuntimeError):
  """The loss or gradient norm was not finite (and `train.nan_policy == 'stop'`)."""


def mesh_from_config(config: ml_collections.ConfigDict):
  """(mesh, rules, frozen_rules) of the run: `config.mesh` over every device, or the first
  `config.mesh.num_devices` of them."""
  mesh_config = config.get("mesh", None) or {}
  n = int(mesh_config.get("num_devices", 0) or 0)
  devices = None
  if n:
    if jax.process_count() > 1:
      raise ValueError(f"mesh.num_devices={n} needs a single process; this job has {jax.process_count()}")
    if n > jax.device_count():
      raise ValueError(f"mesh.num_devices={n} but only {jax.device_count()} devices are visible")
    devices = jax.devices()[:n]
  return sh.from_config(config, devices)


class BatchFeeder:
  """Host batches -> global arrays on the mesh, with the shardings of the train step.

  With `data.shard_by_process` each process holds its own rows (`global_batch`); otherwise
  every process holds the whole batch and each device takes its rows from it.
  """

  def __init__(self, mesh, rules, per_process: bool):
    self.mesh, self.rules, self.per_process = mesh, rules, per_process

  def global_shape(self, batch: dict) -> dict:
    scale = jax.process_count() if self.per_process else 1
    return {k: jax.ShapeDtypeStruct((np.shape(v)[0] * scale,) + np.shape(v)[1:], np.asarray(v).dtype)
            for k, v in batch.items()}

  def __call__(self, batch: dict) -> dict:
    batch = {k: np.asarray(v) for k, v in batch.items()}
    if self.per_process:
      return sh.global_batch(batch, self.mesh, self.rules)
    shardings = sh.batch_shardings(batch, self.mesh, self.rules)
    return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx])
            for k, v in batch.items()}


def gather_data_states(data_state: Any) -> Any:
  """Every process's data-iterator state, for a checkpoint written once for all of them.

  One process: the state itself. Several: `{"per_process": [state_0, state_1, ...]}`
  (each process reads its own slice of the data, so each resumes from its own state).
  """
  if jax.process_count() == 1:
    return data_state
  blob = np.frombuffer(json.dumps(checkpoint_lib.encode_data_state(data_state)).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.asarray([blob.size], np.int32))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:blob.size] = blob
  blobs = multihost_utils.process_allgather(padded)
  return {"per_process": [json.loads(bytes(b[:int(n)]).decode())
                          for b, n in zip(np.asarray(blobs), np.asarray(sizes).reshape(-1))]}


def own_data_state(saved: Any, per_process: bool) -> Any:
  """This process's data-iterator state out of what `gather_data_states` saved.

  A checkpoint from another number of processes resumes each process at the same
  position in its own slice (exact when the batches do not depend on the process count,
  `data.shard_by_process=False`; otherwise the slices themselves changed).
  """
  if not (isinstance(saved, dict) and "per_process" in saved):
    return saved
  states = saved["per_process"]
  p = jax.process_index()
  if len(states) != jax.process_count():
    log.warning("the checkpoint's data state comes from %d processes, this job has %d: every process resumes"
                " at process 0's position%s", len(states), jax.process_count(),
                "" if not per_process else " in its own (new) slice of the data")
    p = 0
  return checkpoint_lib.decode_data_state(states[p])


def blank_images(batch: dict) -> dict:
  """The ablation: every image replaced by black pixels (the text, <image> tokens included, stays)."""
  out = dict(batch)
  out["images"] = np.zeros_like(np.asarray(batch["images"]))
  return out


def prepare_batch(config: ml_collections.ConfigDict, batch: dict) -> dict:
  return blank_images(batch) if bool(config.data.blank_images) else batch


def evaluate_loss(eval_step, params, batches: Iterable[dict], config, max_batches: int = 0,
                  put: Callable[[dict], Any] = lambda b: b) -> float:
  """Token-weighted mean validation loss over (at most `max_batches` of) `batches`
  (`put` places each host batch for `eval_step`)."""
  total, count = 0.0, 0.0
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    t, c = jax.device_get(eval_step(params, put(prepare_batch(config, batch))))
    total += float(t)
    count += float(c)
  return total / max(count, 1.0)


class _Interrupted(Exception):
  """SIGTERM arrived while the loop was blocked outside a step (reading data)."""


class _Preemption:
  """Turns SIGTERM into a flag the loop checks once per step.

  One process: a Python SIGTERM handler sets the flag; inside `interruptible()` (the
  data loader, which can block for as long as its source does) it also raises
  `_Interrupted`, so the run stops within moments whatever the loader is doing, and saves
  the state of the last completed step. Several: JAX's preemption
  service (started by `jax.distributed.initialize`) catches the signal on whichever
  process gets it and agrees with every process on the step at which all of them stop
  (`multihost_utils.reached_preemption_sync_point`), so they save the same step together.
  """

  def __init__(self):
    self.requested = False
    self._old = None
    self._blocking = False
    self.multiprocess = jax.process_count() > 1

  def interruptible(self):
    """A context in which SIGTERM raises `_Interrupted` instead of only setting the flag."""
    return _Blocking(self)

  def check(self, step: int) -> bool:
    if self.multiprocess:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service)
        return False
    return self.requested

  def __enter__(self):
    if self.multiprocess:
      return self  # a Python handler would replace the preemption service's
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, as in a notebook thread
      self._old = None
    return self

  def _handle(self, signum, frame):
    self.requested = True
    if self._blocking:
      self._blocking = False
      raise _Interrupted()

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


class _Blocking:

  def __init__(self, preemption: _Preemption):
    self.preemption = preemption

  def __enter__(self):
    if self.preemption.requested and not self.preemption.multiprocess:
      raise _Interrupted()
    self.preemption._blocking = True  # pylint: disable=protected-access

  def __exit__(self, *exc):
    self.preemption._blocking = False  # pylint: disable=protected-access


def _say(message: str):
  """A line on stdout from process 0 (and in the log)."""
  log.info(message)
  if jax.process_index() == 0:
    print(f"mmjax train: {message}", flush=True)


def _fmt_policy(config) -> str:
  policy = str(config.train.nan_policy)
  if policy not in ("stop", "skip"):
    raise ValueError(f"train.nan_policy={policy!r}; expected 'stop' or 'skip'")
  return policy


def train(config: ml_collections.ConfigDict, workdir: str, task: Task, *, allow_config_change: bool = False,
          restart: bool = False) -> dict:
  """Trains into `workdir` (resuming there if it holds checkpoints); returns a summary dict.

  Summary keys: `start_step` (where this run began), `step` (where it stopped),
  `preempted` (SIGTERM), `last_loss`, `skipped_steps`, `val_loss` (if evaluated).

  The run owns `workdir` while it trains (`workdir.TrainLock`); a config that changes
  what the directory's run is raises `workdir.ConfigChanged` before anything is written,
  unless `allow_config_change` (resume under the new config) or `restart` (move the old
  run to `workdir/previous/` and start at step 0).
  """
  _fmt_policy(config)
  _max_consecutive_skips(config)
  with _own_workdir(config, workdir, task, allow_config_change=allow_config_change, restart=restart):
    return _train(config, workdir, task)


def _max_consecutive_skips(config) -> int:
  n = int(config.train.get("max_consecutive_skips", 5))
  if n < 1:
    raise ValueError(f"train.max_consecutive_skips={n}; expected a count >= 1")
  return n


def _all_processes_agree(ok: bool) -> bool:
  """Process 0's `ok`, on every process (so that a refusal on process 0 stops the whole job)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(ok, np.int32)))


@contextlib.contextmanager
def _own_workdir(config, workdir: str, task: Task, *, allow_config_change: bool, restart: bool):
  """Checks and holds `workdir` for a training run; see `train`."""
  first = jax.process_index() == 0
  if not workdir_lib.is_local(workdir):
    log.warning("%s is not a local path: it is not locked, so run one training per work directory", workdir)
    yield
    return
  lock = workdir_lib.TrainLock(workdir, command=" ".join(sys.argv) or "mmjax train")
  with contextlib.ExitStack() as held:
    error = None
    if first:
      try:
        workdir_lib.ensure_writable(workdir)
        held.enter_context(lock)
      except (OSError, workdir_lib.WorkdirLocked) as e:
        error = e
    if not _all_processes_agree(error is None):
      raise error if error is not None else workdir_lib.WorkdirLocked(
          f"process 0 of this job could not take work directory {workdir!r}; see its output")
    if lock.taken_over:
      _say(f"took over the lock of a training that is no longer running: {lock.taken_over}")
    if restart and first:
      moved = workdir_lib.start_over(workdir)
      if moved:
        _say(f"--restart: the previous run in {workdir} was moved to {moved}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mmjax_restart")  # the move is done before anyone reads
    recorded = None
    if os.path.exists(os.path.join(workdir, config_lib.RESOLVED_CONFIG)):
      with open(os.path.join(workdir, config_lib.RESOLVED_CONFIG)) as f:
        recorded = json.load(f)
      # Written before configs named their family: they were all the default one.
      if isinstance(recorded.get("model"), dict):
        recorded["model"].setdefault("family", families.DEFAULT)
    workdir_lib.check_resume(workdir, recorded, json.loads(config.to_json_best_effort()),
                             allow_change=allow_config_change)
    if task.workdir_files is not None:
      workdir_lib.record_files(workdir, task.workdir_files(), write=first)
    config_lib.write_resolved(config, workdir)
    yield


def _train(config: ml_collections.ConfigDict, workdir: str, task: Task) -> dict:
  policy = _fmt_policy(config)
  max_skips = _max_consecutive_skips(config)
  num_steps = int(config.train.num_steps)
  schedule = optimizer_lib.make_schedule(config)
  seed = int(config.seed)
  init_key = jax.random.key(seed)
  abstract_params = jax.eval_shape(task.init_params, init_key)
  labels = task.param_labels(abstract_params)
  stages = optimizer_lib.parse_stages(str(config.freeze.stages), task.components or optimizer_lib.components_of(labels))
  masks = [optimizer_lib.trainable_mask(labels, s.trainable) for s in stages]
  txs = [optimizer_lib.make_transform(config, m) for m in masks]
  on_cpu = jax.devices()[0].platform == "cpu"
  mesh, rules, frozen_rules = mesh_from_config(config)
  boxed = task.boxed_params(init_key) if task.boxed_params is not None else abstract_params
  per_process = bool(config.data.get("shard_by_process", True))
  batch_axes = sh.batch_sharding(mesh, rules).spec[0]
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
  split = math.prod(mesh.shape[a] for a in batch_axes)
  if int(config.data.batch_size) % split:
    raise ValueError(
        f"data.batch_size={int(config.data.batch_size)} does not split over the {split}-way batch axes"
        f" {batch_axes} of the mesh {dict(mesh.shape)}: use a multiple of {split}, or a mesh with fewer"
        f" batch-parallel devices (--config.mesh.*, e.g. --config.mesh.num_devices=N on one process)")
  put = BatchFeeder(mesh, rules, per_process)
  _say(f"mesh {dict(mesh.shape)} over {mesh.devices.size} devices in {jax.process_count()} process"
       f"{'es' if jax.process_count() > 1 else ''}; rules {(config.get('sharding', None) or {}).get('rules', 'fsdp')}")

  def abstract_state(i, step=0):
    return jax.eval_shape(lambda: state_lib.create(task.init_params(init_key), txs[i], seed, step))

  shardings = {}  # stage -> (state shardings, param shardings)

  def state_shardings(i):
    if i not in shardings:
      shardings[i] = sharded_step.state_shardings(abstract_state(i), lambda s: s.params, boxed, mesh, rules,
                                                trainable=masks[i], frozen_rules=frozen_rules)
    return shardings[i]

  def build_step(i, abstract_batch):
    fn = step_lib.make_train_step(apply_fn=task.apply_fn, loss_fn=task.loss_fn, tx=txs[i], mask=masks[i],
                                  schedule=schedule,
                                  grad_accum_steps=int(config.optimizer.grad_accum_steps),
                                  remat=str(config.train.remat))
    # Donation saves a copy of the state on accelerators; on CPU it buys nothing and
    # would race with an asynchronous checkpoint reading the previous state.
    return sharded_step.shard_train_step(fn, abstract_state(i), abstract_batch, boxed, mesh, rules,
                                       trainable=masks[i], frozen_rules=frozen_rules, donate=not on_cpu)

  def template(step):
    # The abstract state saved at `step`, with this run's shardings: a checkpoint written
    # on any mesh (any number of processes) restores onto this one.
    i = optimizer_lib.stage_index(stages, max(step - 1, 0))
    return jax.tree.map(lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        abstract_state(i, step), state_shardings(i)[0])

  ckpt = checkpoint_lib.Checkpointer(workdir, config)
  writer = metrics_lib.MetricWriter(workdir, tensorboard=bool(config.log.tensorboard), progress_total=num_steps,
                                    print_every=int(config.log.get("print_every", 50)))
  data = task.train_data()
  restored = ckpt.restore_latest(template)
  if restored is not None:
    step, state, data_state = restored
    data.set_state(own_data_state(data_state, per_process))
    opt_stage = optimizer_lib.stage_index(stages, max(step - 1, 0))
    _say(f"resumed from step {step}")
  else:
    step = 0
    sshard, pshard = state_shardings(0)
    # jit(init_params) alone, so that `jax.jit(task.init_params)(key)` reproduces these
    # parameters bitwise (fusing init into a bigger program can move the last ulp); the
    # parameters are created already split over the mesh.
    params = jax.jit(task.init_params, out_shardings=pshard)(init_key)
    state = jax.jit(lambda p: state_lib.create(p, txs[0], seed), out_shardings=sshard)(params)
    opt_stage = 0
  start_step = step
  eval_jit = None

  def eval_step(params, batch):
    nonlocal eval_jit
    if eval_jit is None:
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      eval_jit = jax.jit(step_lib.make_eval_step(task.apply_fn, task.loss_fn),
                         in_shardings=(state_shardings(cur_stage)[1], sh.batch_shardings(batch, mesh, rules)),
                         out_shardings=replicated)
    with sh.activation_rules(mesh, rules):
      return eval_jit(params, batch)

  flops = {}
  peak = flops_lib.peak_flops_per_device(float(config.log.peak_tflops))
  n_dev = jax.device_count()
  summary = {"start_step": start_step, "step": step, "preempted": False, "last_loss": None, "skipped_steps": 0}
  pending = None  # (step, metrics on device, batch stats) of the step dispatched last
  last_done = time.perf_counter()
  cur_stage, step_fn = None, None
  skips = {"total": 0, "consecutive": 0}

  def flush(pending):
    nonlocal last_done
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
    finite = m["finite"] >= 1.0
    skips["consecutive"] = 0 if finite else skips["consecutive"] + 1
    skips["total"] += 0 if finite else 1
    m["skipped_steps"] = float(skips["total"])  # updates skipped so far in this run
    writer.write(s, "train", m)
    writer.progress(s, m)
    summary["last_loss"] = m["loss"]
    summary["skipped_steps"] = skips["total"]
    if finite:
      return
    done = ckpt.steps()
    where = f"checkpoint step {done[-1]}" if done else "no checkpoint (restart from scratch)"
    if policy == "stop" or skips["consecutive"] >= max_skips:
      why = ("" if policy == "stop" else
             f"{skips['consecutive']} updates in a row were skipped (train.max_consecutive_skips={max_skips}); ")
      raise TrainingDiverged(
          f"{why}loss={m['loss']} grad_norm={m['grad_norm']} at step {s}; the update was not applied. "
          f"Resume from {where} in {ckpt.directory} by rerunning the same command "
          "(lower --config.optimizer.lr" + (" or set --config.train.nan_policy=skip)" if policy == "stop" else ")"))
    log.warning("step %d: loss=%s grad_norm=%s is not finite; update skipped (%d so far, %d in a row)",
                s, m["loss"], m["grad_norm"], skips["total"], skips["consecutive"])

  def stop_for_sigterm():
    log.warning("SIGTERM: saving step %d and exiting", step)
    ckpt.save(step, state, gather_data_states(data_state), config, force=True)
    summary["preempted"] = True

  bsz = 0
  data_state = data.get_state()  # the position after the last batch a completed step used
  try:
    with _Preemption() as preempt:
      while step < num_steps:
        si = optimizer_lib.stage_index(stages, step)
        try:
          with preempt.interruptible():
            raw = next(data)
        except _Interrupted:
          if pending is not None:
            flush(pending)
            pending = None
          stop_for_sigterm()
          break
        batch = prepare_batch(config, raw)
        data_state = data.get_state()
        if si != cur_stage:
          cur_stage, step_fn = si, build_step(si, put.global_shape(batch))
          if opt_stage != si:
            # A new stage: a new set of trainable leaves, a fresh optimizer state for them.
            state = jax.jit(lambda s, tx=txs[si]: s.replace(opt_state=tx.init(s.params)),
                            out_shardings=state_shardings(si)[0])(state)
            opt_stage = si
        gbatch = put(batch)
        bsz = int(gbatch["input_ids"].shape[0])
        ntok = float(np.prod(gbatch["input_ids"].shape))
        # Images of the global batch: this process's count times the processes (exact
        # when every process holds the whole batch).
        nimg = float(np.sum(batch.get("image_mask", 0))) * (jax.process_count() if per_process else 1)
        state, metrics = step_fn(state, gbatch)
        if pending is not None:
          flush(pending)
        pending = (step, metrics, ntok, nimg, si)
        step += 1
        summary["step"] = step
        if ckpt.due(step):
          ckpt.save(step, state, gather_data_states(data_state), config)
        every = int(config.eval.every_steps)
        if task.val_data is not None and every > 0 and step % every == 0:
          flush(pending)
          pending = None
          val = evaluate_loss(eval_step, state.params, task.val_data(), config, int(config.eval.num_batches), put)
          writer.write(step, "eval", {"val_loss": val})
          summary["val_loss"] = val
          ckpt.save_best(step, state, gather_data_states(data_state), config, val)
          last_done = time.perf_counter()
        if preempt.check(step):
          flush(pending)
          pending = None
          stop_for_sigterm()
          break
      if pending is not None:
        flush(pending)
        pending = None
      if not summary["preempted"] and step == num_steps:
        ckpt.save(step, state, gather_data_states(data.get_state()), config, force=True)
  finally:
    ckpt.close()
    writer.close()
  summary["state"] = state
  return summary


def restore_params(config: ml_collections.ConfigDict, workdir: str, task: Task):
  """(step, params) of the newest complete checkpoint in `workdir` (for eval and generate)."""
  labels = task.param_labels(jax.eval_shape(task.init_params, jax.random.key(int(config.seed))))
  stages = optimizer_lib.parse_stages(str(config.freeze.stages), task.components or optimizer_lib.components_of(labels))
  txs = [optimizer_lib.make_transform(config, optimizer_lib.trainable_mask(labels, s.trainable)) for s in stages]

  def template(step):
    i = optimizer_lib.stage_index(stages, max(step - 1, 0))
    return jax.eval_shape(lambda: state_lib.create(task.init_params(jax.random.key(int(config.seed))), txs[i],
                                                   int(config.seed), step))

  ckpt = checkpoint_lib.Checkpointer(workdir, config, read_only=True)
  try:
    restored = ckpt.restore_latest(template)
  finally:
    ckpt.close()
  if restored is None:
    raise ValueError(f"{workdir!r} holds no complete checkpoint; run `mmjax train --workdir {workdir}` first")
  return restored[0], restored[1].params
