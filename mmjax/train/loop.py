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
import dataclasses
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
from mmjax.train import pretrained
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
  """The ablation: every image replaced by black pixels (the text, <image> tokens included, stays).

  A text-only batch (no "images") has nothing to blank and comes back as it is, so a
  blank-image control can share its data mixture with a text-only stream.
  """
  if "images" not in batch:
    return batch
  out = dict(batch)
  out["images"] = np.zeros_like(np.asarray(batch["images"]))
  return out


def prepare_batch(config: ml_collections.ConfigDict, batch: dict) -> dict:
  """The batch as the step sees it: with `data.blank_images`, the control run's blanked images."""
  return blank_images(batch) if bool(config.data.get("blank_images", False)) else batch


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


@dataclasses.dataclass
class _Plan:
  """What a run trains, over which devices, under which policies: fixed from its first step to its last.

  Each freeze stage (`freeze.stages`) has its own trainable mask and optimizer, so its own
  state shardings and jitted step; the plan builds those when a stage is first reached.
  """
  config: ml_collections.ConfigDict
  task: Task
  num_steps: int
  seed: int
  init_key: jax.Array
  schedule: Any  # step -> learning rate
  stages: tuple  # optimizer_lib.Stage, sorted by start step
  masks: list  # per stage: pytree of bools over the parameters, True = trainable
  txs: list  # per stage: its optimizer, which keeps state for the trainable leaves only
  mesh: jax.sharding.Mesh
  rules: Any  # sharding rules of trainable parameters and activations
  frozen_rules: Any  # sharding rules of frozen parameters (None: `rules`)
  boxed: Any  # the abstract parameters with their logical-axis boxes, which the rules read
  per_process: bool  # `data.shard_by_process`: each process reads its own rows
  put: BatchFeeder
  # Donation saves a copy of the state on accelerators; on CPU it buys nothing and
  # would race with an asynchronous checkpoint reading the previous state.
  donate: bool
  nan_policy: str  # 'stop' or 'skip'
  max_skips: int  # `train.max_consecutive_skips`
  peak_flops: float | None  # of one device, for the MFU; None: unknown
  num_devices: int
  _shardings: dict = dataclasses.field(default_factory=dict, repr=False)  # stage -> (state, params)
  _flops: dict = dataclasses.field(default_factory=dict, repr=False)  # stage -> FLOPs per example

  def abstract_state(self, stage: int, step: int = 0):
    return jax.eval_shape(lambda: state_lib.create(self.task.init_params(self.init_key), self.txs[stage],
                                                   self.seed, step))

  def state_shardings(self, stage: int):
    """(state shardings, param shardings) of `stage`: its frozen leaves follow `frozen_rules`."""
    if stage not in self._shardings:
      self._shardings[stage] = sharded_step.state_shardings(
          self.abstract_state(stage), lambda s: s.params, self.boxed, self.mesh, self.rules,
          trainable=self.masks[stage], frozen_rules=self.frozen_rules)
    return self._shardings[stage]

  def stage_before(self, step: int) -> int:
    """The stage of the last update before `step`, whose optimizer state a checkpoint at `step` holds."""
    return optimizer_lib.stage_index(self.stages, max(step - 1, 0))

  def template(self, step: int):
    """The abstract state saved at `step`, with this run's shardings: a checkpoint written
    on any mesh (any number of processes) restores onto this one."""
    stage = self.stage_before(step)
    return jax.tree.map(lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        self.abstract_state(stage, step), self.state_shardings(stage)[0])

  def build_step(self, stage: int, abstract_batch: dict):
    fn = step_lib.make_train_step(apply_fn=self.task.apply_fn, loss_fn=self.task.loss_fn,
                                  param_metrics=self.task.param_metrics, tx=self.txs[stage],
                                  mask=self.masks[stage], schedule=self.schedule,
                                  grad_accum_steps=int(self.config.optimizer.grad_accum_steps),
                                  remat=str(self.config.train.remat))
    return sharded_step.shard_train_step(fn, self.abstract_state(stage), abstract_batch, self.boxed, self.mesh,
                                         self.rules, trainable=self.masks[stage], frozen_rules=self.frozen_rules,
                                         donate=self.donate)

  def flops_per_example(self, stage: int) -> float | None:
    """Model FLOPs of one example's update in `stage` (asked once per stage); None: no MFU."""
    if self.task.flops_per_example is None or not self.peak_flops:
      return None
    if stage not in self._flops:
      self._flops[stage] = self.task.flops_per_example(self.stages[stage].trainable)
    return self._flops[stage]


def _plan(config: ml_collections.ConfigDict, task: Task) -> _Plan:
  """The run's `_Plan`, after checking that the batch splits over the mesh."""
  nan_policy, max_skips = _fmt_policy(config), _max_consecutive_skips(config)
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
  _check_batch_split(config, mesh, rules)
  put = BatchFeeder(mesh, rules, per_process)
  _say(f"mesh {dict(mesh.shape)} over {mesh.devices.size} devices in {jax.process_count()} process"
       f"{'es' if jax.process_count() > 1 else ''}; rules {(config.get('sharding', None) or {}).get('rules', 'fsdp')}")
  return _Plan(config=config, task=task, num_steps=num_steps, seed=seed, init_key=init_key, schedule=schedule,
               stages=stages, masks=masks, txs=txs, mesh=mesh, rules=rules, frozen_rules=frozen_rules, boxed=boxed,
               per_process=per_process, put=put, donate=not on_cpu, nan_policy=nan_policy, max_skips=max_skips,
               peak_flops=flops_lib.peak_flops_per_device(float(config.log.peak_tflops)),
               num_devices=jax.device_count())


def _check_batch_split(config: ml_collections.ConfigDict, mesh, rules):
  """Raises ValueError unless `data.batch_size` divides over the mesh's batch-parallel axes."""
  batch_axes = sh.batch_sharding(mesh, rules).spec[0]
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes or ())
  split = math.prod(mesh.shape[a] for a in batch_axes)
  if int(config.data.batch_size) % split:
    raise ValueError(
        f"data.batch_size={int(config.data.batch_size)} does not split over the {split}-way batch axes"
        f" {batch_axes} of the mesh {dict(mesh.shape)}: use a multiple of {split}, or a mesh with fewer"
        f" batch-parallel devices (--config.mesh.*, e.g. --config.mesh.num_devices=N on one process)")


@dataclasses.dataclass
class _Dispatched:
  """A step queued on the device whose metrics the host has not fetched yet."""
  step: int
  metrics: dict  # on the device
  tokens: float  # of the global batch
  images: float  # of the global batch
  batch_size: int  # global
  stage: int


@dataclasses.dataclass
class _Run:
  """What a run changes as it goes: the train state and step, and where it reads and writes them."""
  ckpt: checkpoint_lib.Checkpointer
  writer: metrics_lib.MetricWriter
  data: Any  # the training-data iterator, with get_state()/set_state()
  data_state: Any  # the iterator's position after the last batch a dispatched step used
  step: int  # updates done: the index of the next one
  state: Any  # state_lib.TrainState: parameters, optimizer state, step, rng
  opt_stage: int  # the stage whose optimizer `state.opt_state` belongs to
  summary: dict  # what `train` returns
  last_done: float  # perf_counter() when the previous step's metrics came back (or the clock restarted)
  stage: int | None = None  # the stage `step_fn` was built for
  step_fn: Callable | None = None
  pending: _Dispatched | None = None
  total_skips: int = 0  # updates skipped for a non-finite loss in this run
  consecutive_skips: int = 0
  eval_jit: Callable | None = None  # jitted at the first evaluation


def _start(plan: _Plan, workdir: str) -> _Run:
  """Opens the checkpointer, metric writer and data, and resumes from the newest checkpoint
  in `workdir` or makes step 0's state."""
  config = plan.config
  ckpt = checkpoint_lib.Checkpointer(workdir, config)
  writer = metrics_lib.MetricWriter(workdir, tensorboard=bool(config.log.tensorboard), progress_total=plan.num_steps,
                                    print_every=int(config.log.get("print_every", 50)))
  data = plan.task.train_data()
  restored = ckpt.restore_latest(plan.template)
  if restored is not None:
    step, state, data_state = restored
    data.set_state(own_data_state(data_state, plan.per_process))
    opt_stage = plan.stage_before(step)
    _say(f"resumed from step {step}")
  else:
    step, state, opt_stage = 0, _initial_state(plan), 0
  summary = {"start_step": step, "step": step, "preempted": False, "last_loss": None, "skipped_steps": 0}
  return _Run(ckpt=ckpt, writer=writer, data=data, data_state=data.get_state(), step=step, state=state,
              opt_stage=opt_stage, summary=summary, last_done=time.perf_counter())


def _initial_state(plan: _Plan):
  """Step 0's state: fresh parameters from `config.seed` and the first stage's optimizer state."""
  sshard, pshard = plan.state_shardings(0)
  # jit(init_params) alone, so that `jax.jit(task.init_params)(key)` reproduces these
  # parameters bitwise (fusing init into a bigger program can move the last ulp); the
  # parameters are created already split over the mesh.
  params = jax.jit(plan.task.init_params, out_shardings=pshard)(plan.init_key)
  if pretrained.source(plan.config):  # config.init.from_workdir: another run's parameters in place
    params = jax.device_put(pretrained.adopt(plan.config, plan.task, params), pshard)
  return jax.jit(lambda p: state_lib.create(p, plan.txs[0], plan.seed), out_shardings=sshard)(params)


def _enter_stage(plan: _Plan, run: _Run, stage: int, abstract_batch: dict):
  """Builds the jitted step of `stage`. At a stage boundary the trainable set changes, so
  the newly trainable leaves get a fresh optimizer state (a run resumed inside `stage`
  already has its own)."""
  run.stage, run.step_fn = stage, plan.build_step(stage, abstract_batch)
  if run.opt_stage != stage:
    tx = plan.txs[stage]
    run.state = jax.jit(lambda s: s.replace(opt_state=tx.init(s.params)),
                        out_shardings=plan.state_shardings(stage)[0])(run.state)
    run.opt_stage = stage


def _train_step(plan: _Plan, run: _Run, batch: dict):
  """Queues one update on the device, then records the previous one: the host fetches
  that step's metrics while this step runs."""
  stage = optimizer_lib.stage_index(plan.stages, run.step)
  if stage != run.stage:
    _enter_stage(plan, run, stage, plan.put.global_shape(batch))
  gbatch = plan.put(batch)
  tokens = float(np.prod(gbatch["input_ids"].shape))
  # Images of the global batch: this process's count times the processes (exact when
  # every process holds the whole batch).
  images = float(np.sum(batch.get("image_mask", 0))) * (jax.process_count() if plan.per_process else 1)
  run.state, metrics = run.step_fn(run.state, gbatch)
  _record(plan, run)
  run.pending = _Dispatched(step=run.step, metrics=metrics, tokens=tokens, images=images,
                            batch_size=int(gbatch["input_ids"].shape[0]), stage=stage)
  run.step += 1
  run.summary["step"] = run.step


def _record(plan: _Plan, run: _Run):
  """Fetches, writes and checks the metrics of the step dispatched last (if not done yet)."""
  done, run.pending = run.pending, None
  if done is None:
    return
  m = _step_metrics(plan, run, done)
  finite = m["finite"] >= 1.0
  run.consecutive_skips = 0 if finite else run.consecutive_skips + 1
  run.total_skips += 0 if finite else 1
  m["skipped_steps"] = float(run.total_skips)  # updates skipped so far in this run
  run.writer.write(done.step, "train", m)
  run.writer.progress(done.step, m)
  run.summary["last_loss"] = m["loss"]
  run.summary["skipped_steps"] = run.total_skips
  if not finite:
    _apply_nan_policy(plan, run, done.step, m)


def _step_metrics(plan: _Plan, run: _Run, done: _Dispatched) -> dict[str, float]:
  """The step's metrics, with its throughput over the time since the previous step's came back."""
  m = {k: float(v) for k, v in jax.device_get(done.metrics).items()}
  now = time.perf_counter()
  dt = now - run.last_done
  run.last_done = now
  m["step_time"] = dt
  m["tokens_per_s"] = done.tokens / dt
  m["images_per_s"] = done.images / dt
  flops = plan.flops_per_example(done.stage)
  if flops is not None:
    m["mfu"] = flops * done.batch_size / dt / (plan.peak_flops * plan.num_devices)
  return m


def _apply_nan_policy(plan: _Plan, run: _Run, step: int, m: dict[str, float]):
  """Step `step` had a non-finite loss or gradient norm, so its update was not applied:
  raises `TrainingDiverged` under `nan_policy='stop'` or after `max_skips` such steps in a
  row; otherwise warns and the run goes on."""
  skips = run.consecutive_skips
  if plan.nan_policy == "stop" or skips >= plan.max_skips:
    done = run.ckpt.steps()
    where = f"checkpoint step {done[-1]}" if done else "no checkpoint (restart from scratch)"
    why = ("" if plan.nan_policy == "stop" else
           f"{skips} updates in a row were skipped (train.max_consecutive_skips={plan.max_skips}); ")
    raise TrainingDiverged(
        f"{why}loss={m['loss']} grad_norm={m['grad_norm']} at step {step}; the update was not applied. "
        f"Resume from {where} in {run.ckpt.directory} by rerunning the same command "
        "(lower --config.optimizer.lr" + (" or set --config.train.nan_policy=skip)" if plan.nan_policy == "stop"
                                          else ")"))
  log.warning("step %d: loss=%s grad_norm=%s is not finite; update skipped (%d so far, %d in a row)",
              step, m["loss"], m["grad_norm"], run.total_skips, skips)


def _checkpoint_if_due(plan: _Plan, run: _Run):
  """Every `checkpoint.every_steps`: the state after the step just dispatched (saved asynchronously if configured)."""
  if run.ckpt.due(run.step):
    run.ckpt.save(run.step, run.state, gather_data_states(run.data_state), plan.config)


def _evaluate_if_due(plan: _Plan, run: _Run):
  """Every `eval.every_steps`: the validation loss, written, and kept as the best checkpoint
  if it is the lowest yet. The time it takes is no step's: the step clock restarts after."""
  every = int(plan.config.eval.every_steps)
  if plan.task.val_data is None or every <= 0 or run.step % every:
    return
  _record(plan, run)
  val = evaluate_loss(lambda params, batch: _eval_step(plan, run, params, batch), run.state.params,
                      plan.task.val_data(), plan.config, int(plan.config.eval.num_batches), plan.put)
  run.writer.write(run.step, "eval", {"val_loss": val})
  run.summary["val_loss"] = val
  run.ckpt.save_best(run.step, run.state, gather_data_states(run.data_state), plan.config, val)
  run.last_done = time.perf_counter()


def _eval_step(plan: _Plan, run: _Run, params, batch: dict):
  """(loss sum, token count) of one validation batch; jitted at the first call, for the
  parameter shardings of the stage then current."""
  if run.eval_jit is None:
    replicated = jax.sharding.NamedSharding(plan.mesh, jax.sharding.PartitionSpec())
    run.eval_jit = jax.jit(step_lib.make_eval_step(plan.task.apply_fn, plan.task.loss_fn),
                           in_shardings=(plan.state_shardings(run.stage)[1],
                                         sh.batch_shardings(batch, plan.mesh, plan.rules)),
                           out_shardings=replicated)
  with sh.activation_rules(plan.mesh, plan.rules):
    return run.eval_jit(params, batch)


def _stop_for_sigterm(plan: _Plan, run: _Run):
  """The preemption exit: records the last step dispatched, then saves the state after it
  with the data position after its batch, so a rerun resumes exactly there."""
  _record(plan, run)
  log.warning("SIGTERM: saving step %d and exiting", run.step)
  run.ckpt.save(run.step, run.state, gather_data_states(run.data_state), plan.config, force=True)
  run.summary["preempted"] = True


def _train(config: ml_collections.ConfigDict, workdir: str, task: Task) -> dict:
  """`train` once the work directory is held: the order of the parts above, step by step."""
  plan = _plan(config, task)
  run = _start(plan, workdir)
  try:
    with _Preemption() as preempt:
      while run.step < plan.num_steps:
        try:
          with preempt.interruptible():
            raw = next(run.data)
        except _Interrupted:
          _stop_for_sigterm(plan, run)
          break
        batch = prepare_batch(config, raw)
        run.data_state = run.data.get_state()
        _train_step(plan, run, batch)
        _checkpoint_if_due(plan, run)
        _evaluate_if_due(plan, run)
        if preempt.check(run.step):
          _stop_for_sigterm(plan, run)
          break
      _record(plan, run)
      if not run.summary["preempted"] and run.step == plan.num_steps:
        run.ckpt.save(run.step, run.state, gather_data_states(run.data.get_state()), config, force=True)
  finally:
    run.ckpt.close()
    run.writer.close()
  run.summary["state"] = run.state
  return run.summary


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
