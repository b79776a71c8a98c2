"""Checkpoints: Orbax `CheckpointManager` with the train state, the data-iterator state and
the config saved together under one step.

Layout: `WORKDIR/checkpoints/<step>/{state,data,config}`; Orbax writes each step into a
temporary directory and renames it when complete (atomic commit), asynchronously when
`checkpoint.async_save`. Optionally `WORKDIR/checkpoints_best/` keeps the step with the
lowest validation loss.

Two roles, and what each may do to the directory:

- The *writer* (`mmjax train`, holding the work directory's lock) saves, applies the
  retention policy, removes temporary directories left by a killed run, and moves a step
  that fails its integrity check to `WORKDIR/checkpoints_corrupt/` before trying the
  previous one.
- A *reader* (`read_only=True`: `mmjax eval`, `mmjax generate`, a notebook) writes
  nothing: no clean-up (a temporary directory may be a save in progress), no quarantine.
  A step the writer's retention removes while it is being read is skipped for the next.

A restore that fails is told apart before anything is moved: a step whose saved tree or
shapes differ from what this config builds (a changed model field, another vocabulary)
is not corrupt, and raises `CheckpointMismatch` listing the differing leaves and config
fields. Only a step whose metadata cannot be read, or whose arrays cannot be read though
its metadata matches, is corrupt.

Saving checks the free space first: a save that would not fit raises `DiskFull` with the
bytes needed and available, and every earlier checkpoint stays as it was.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
import warnings
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from mmjax.errors import MmjaxError
from mmjax.train import workdir as workdir_lib

log = logging.getLogger(__name__)

# Orbax's own files and alignment on top of the arrays' bytes, and a floor for tiny states.
_SPACE_OVERHEAD = 1.1
_SPACE_FLOOR = 4 << 20


class CheckpointMismatch(MmjaxError, ValueError):
  """A checkpoint that is intact but does not fit what this config builds."""


class DiskFull(MmjaxError, OSError):
  """A save would not fit in the free space of the checkpoint directory."""

  def __init__(self, message: str):
    super().__init__(errno.ENOSPC, message)

  def __str__(self):
    return self.strerror


def encode_data_state(state: Any) -> dict:
  """A data-iterator state (grain gives bytes holding JSON; others a dict) as a JSON dict."""
  if isinstance(state, bytes):
    return {"kind": "bytes", "value": state.decode("utf-8")}
  if isinstance(state, str):
    return {"kind": "str", "value": state}
  return {"kind": "json", "value": state}


def decode_data_state(d: dict) -> Any:
  if d["kind"] == "bytes":
    return d["value"].encode("utf-8")
  return d["value"]


def free_bytes(path: str) -> int:
  """Bytes an unprivileged writer may still use on the file system holding `path`."""
  st = os.statvfs(path)
  return st.f_bavail * st.f_frsize


def state_bytes(state) -> int:
  """Bytes of the arrays of a (possibly abstract) state: what a checkpoint of it holds."""
  return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)
                 if hasattr(x, "shape")))


def _mib(n: float) -> str:
  return f"{n / 2**20:,.1f} MiB"


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def leaf_shapes(tree) -> dict[str, tuple]:
  """{"params/lm_head/kernel": shape, ...} of a pytree of arrays or of Orbax array metadata."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if hasattr(leaf, "shape"):
      out["/".join(_key_name(k) for k in path)] = tuple(leaf.shape)
  return out


def _tree_differences(saved: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
  diffs = [f"{k}: saved {list(saved[k])}, this config builds {list(expected[k])}"
           for k in sorted(set(saved) & set(expected)) if saved[k] != expected[k]]
  diffs += [f"{k}: in the checkpoint only" for k in sorted(set(saved) - set(expected))]
  diffs += [f"{k}: built by this config only" for k in sorted(set(expected) - set(saved))]
  return diffs


class Checkpointer:
  """Saves and restores (state, data-iterator state, config) by step in a work directory.

  `read_only=True` opens it for reading alone (see the module docstring).
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, *, read_only: bool = False):
    c = config.checkpoint
    self.workdir = workdir
    self.config = config
    self.read_only = read_only
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.corrupt_dir = os.path.abspath(os.path.join(workdir, "checkpoints_corrupt"))
    self.every = int(c.every_steps)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler()}
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False,
                                             cleanup_tmp_directories=False)
    else:
      options = ocp.CheckpointManagerOptions(
          save_interval_steps=1,  # the loop decides when; a forced save (SIGTERM) must go through
          max_to_keep=int(c.keep) if int(c.keep) > 0 else None,
          enable_async_checkpointing=bool(c.async_save),
          # The writer holds the work directory's lock, so a temporary directory here is a
          # save that died with its process, and a stale one breaks re-saves of its step.
          cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self.best = None
    if bool(c.keep_best) and not read_only:
      best_options = ocp.CheckpointManagerOptions(
          max_to_keep=1, best_fn=lambda m: float(m["val_loss"]), best_mode="min",
          keep_checkpoints_without_metrics=False, enable_async_checkpointing=False, cleanup_tmp_directories=True)
      self.best = ocp.CheckpointManager(os.path.join(workdir, "checkpoints_best"), options=best_options,
                                        item_handlers=dict(handlers))

  def _args(self, state, data_state, config):
    return ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(encode_data_state(data_state)),
                              config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())))

  def due(self, step: int) -> bool:
    """Whether `step` is a regular checkpoint step (`checkpoint.every_steps`)."""
    return self.every > 0 and step % self.every == 0

  def _check_space(self, step: int, state, directory: str):
    needed = max(state_bytes(state) * _SPACE_OVERHEAD, _SPACE_FLOOR)
    os.makedirs(directory, exist_ok=True)
    free = free_bytes(directory)
    if free < needed:
      kept = self.steps()
      raise DiskFull(
          f"cannot save the checkpoint of step {step}: it needs about {_mib(needed)} in {directory}, which has "
          f"{_mib(free)} free. " + (f"The checkpoint of step {kept[-1]} is kept as it was; free some space and "
                                    "rerun the same command to resume from it" if kept else
                                    "No earlier checkpoint exists; free some space and rerun"))

  def _explain_os_error(self, e: Exception, step: int | None) -> Exception:
    """A DiskFull in place of an out-of-space error (an OSError from Python, a ValueError
    from TensorStore's writers that carries `os_error_code='28'`); `e` otherwise."""
    if isinstance(e, DiskFull):
      return e
    out_of_space = (getattr(e, "errno", None) == errno.ENOSPC
                    or f"os_error_code='{errno.ENOSPC}'" in str(e) or "No space left on device" in str(e))
    if out_of_space:
      kept = [s for s in self.steps() if s != step]
      what = f"step {step}" if step is not None else "a checkpoint"
      return DiskFull(f"the disk holding {self.directory} filled up while saving {what}"
                      + (f"; the checkpoint of step {kept[-1]} is kept as it was" if kept else "")
                      + "; free some space and rerun the same command to resume")
    return e

  def save(self, step: int, state, data_state, config, *, force: bool = False) -> bool:
    """Starts saving `step` (asynchronously if configured); returns whether it saved."""
    if self.read_only:
      raise RuntimeError(f"{self.directory} was opened read-only; a reader never saves")
    if not force and (self.every <= 0 or step % self.every):
      return False
    if step in self.manager.all_steps():
      return False
    try:
      # The previous asynchronous save first: its bytes are on the disk before these are counted.
      self.manager.wait_until_finished()
      self._check_space(step, state, self.directory)
      return self.manager.save(step, args=self._args(state, data_state, config), force=True)
    except (OSError, ValueError) as e:
      raise self._explain_os_error(e, step) from None

  def save_best(self, step: int, state, data_state, config, val_loss: float):
    if self.best is not None and step not in self.best.all_steps():
      self._check_space(step, state, str(self.best.directory))
      self.best.save(step, args=self._args(state, data_state, config), metrics={"val_loss": float(val_loss)},
                     force=True)
      self.best.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, template_fn) -> tuple[int, Any, Any] | None:
    """Restores the newest step that restores cleanly: (step, state, data_state), or None.

    `template_fn(step)` gives an abstract state (jax.ShapeDtypeStruct leaves, shardings
    included) of the structure saved at `step`. Raises `CheckpointMismatch` (moving
    nothing) when a step is intact but does not fit that structure.
    """
    tried = set()
    while True:
      if self.read_only:
        self.manager.reload()  # the writer may have saved or removed steps since
      candidates = [s for s in sorted(self.manager.all_steps(), reverse=True) if s not in tried]
      if not candidates:
        return None
      step = candidates[0]
      tried.add(step)
      template = template_fn(step)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template), data=ocp.args.JsonRestore()))
        return step, restored["state"], decode_data_state(restored["data"])
      except Exception as e:  # noqa: BLE001 -- told apart below
        error = e
      if not os.path.isdir(os.path.join(self.directory, str(step))):
        continue  # removed by the writer's retention while we read it: try what is there now
      self._raise_if_mismatch(step, template)
      msg = (f"checkpoint at step {step} in {self.directory} is corrupted or incomplete "
             f"({type(error).__name__}: {str(error)[:200]}); ")
      if self.read_only:
        msg += "trying the previous one (left in place: this process only reads)"
      else:
        msg += f"moving it to {self.corrupt_dir} and trying the previous one"
      warnings.warn(msg, RuntimeWarning, stacklevel=2)
      log.warning(msg)
      if not self.read_only:
        self._quarantine(step)

  def _raise_if_mismatch(self, step: int, template):
    """Raises CheckpointMismatch if step's readable metadata disagrees with `template`."""
    try:
      metadata = self.manager.item_metadata(step)
      saved = leaf_shapes(metadata["state"])
    except Exception:  # noqa: BLE001 -- unreadable metadata: the step is corrupt, not different
      return
    if not saved:
      return
    diffs = _tree_differences(saved, leaf_shapes(template))
    if not diffs:
      return
    shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
    fields = self._config_differences(step)
    raise CheckpointMismatch(
        f"the checkpoint of step {step} in {self.directory} is intact but does not fit the model this config "
        f"builds ({shown}). " + (f"It was saved with {fields}. " if fields else "")
        + "Nothing was moved. Use the config it was trained with, or train into a new --workdir "
        "(`mmjax train --restart` starts over here, moving the old run aside)")

  def _config_differences(self, step: int) -> str:
    try:
      saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    except Exception:  # noqa: BLE001 -- the diagnosis is best-effort
      return ""
    current = json.loads(self.config.to_json_best_effort())
    diffs = workdir_lib.config_differences(saved, current)
    return ", ".join(f"{f}={old!r} (now {new!r})" for f, old, new in diffs[:8])

  def _quarantine(self, step: int):
    if jax.process_index() != 0:
      return
    src = os.path.join(self.directory, str(step))
    if os.path.exists(src):
      os.makedirs(self.corrupt_dir, exist_ok=True)
      shutil.move(src, os.path.join(self.corrupt_dir, f"{step}-{int(time.time())}"))
    self.manager.reload()

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except (OSError, ValueError) as e:
      raise self._explain_os_error(e, None) from None

  def close(self):
    try:
      if not self.read_only:
        self.manager.wait_until_finished()
    except (OSError, ValueError) as e:
      raise self._explain_os_error(e, None) from None
    finally:
      self.manager.close()
      if self.best is not None:
        self.best.close()
