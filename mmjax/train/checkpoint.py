"""Checkpoints: Orbax `CheckpointManager` with the train state, the data-iterator state and
the config saved together under one step.

Layout: `WORKDIR/checkpoints/<step>/{state,data,config}`; Orbax writes each step into a
temporary directory and renames it when complete (atomic commit), asynchronously when
`checkpoint.async_save`. At restore the newest step is tried first; a step that fails to
restore (a process killed half-way through, a truncated file) is moved to
`WORKDIR/checkpoints_corrupt/` with a warning naming it, and the previous step is tried.
Optionally `WORKDIR/checkpoints_best/` keeps the step with the lowest validation loss.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


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


class Checkpointer:
  """Saves and restores (state, data-iterator state, config) by step in a work directory."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    c = config.checkpoint
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.corrupt_dir = os.path.abspath(os.path.join(workdir, "checkpoints_corrupt"))
    self.every = int(c.every_steps)
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=1,  # the loop decides when; a forced save (SIGTERM) must go through
        max_to_keep=int(c.keep) if int(c.keep) > 0 else None,
        enable_async_checkpointing=bool(c.async_save),
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))
    self.best = None
    if bool(c.keep_best):
      best_options = ocp.CheckpointManagerOptions(
          max_to_keep=1, best_fn=lambda m: float(m["val_loss"]), best_mode="min",
          keep_checkpoints_without_metrics=False, enable_async_checkpointing=False, cleanup_tmp_directories=True)
      self.best = ocp.CheckpointManager(os.path.join(workdir, "checkpoints_best"), options=best_options,
                                        item_names=("state", "data", "config"))

  def _args(self, state, data_state, config):
    return ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(encode_data_state(data_state)),
                              config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())))

  def due(self, step: int) -> bool:
    """Whether `step` is a regular checkpoint step (`checkpoint.every_steps`)."""
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state, data_state, config, *, force: bool = False) -> bool:
    """Starts saving `step` (asynchronously if configured); returns whether it saved."""
    if not force and (self.every <= 0 or step % self.every):
      return False
    if step in self.manager.all_steps():
      return False
    return self.manager.save(step, args=self._args(state, data_state, config), force=True)

  def save_best(self, step: int, state, data_state, config, val_loss: float):
    if self.best is not None and step not in self.best.all_steps():
      self.best.save(step, args=self._args(state, data_state, config), metrics={"val_loss": float(val_loss)},
                     force=True)
      self.best.wait_until_finished()

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def restore_latest(self, template_fn) -> tuple[int, Any, Any] | None:
    """Restores the newest step that restores cleanly: (step, state, data_state), or None.

    `template_fn(step)` gives an abstract state (jax.ShapeDtypeStruct leaves, shardings
    included) of the structure saved at `step`.
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template_fn(step)), data=ocp.args.JsonRestore()))
        return step, restored["state"], decode_data_state(restored["data"])
      except Exception as e:  # noqa: BLE001 -- any failure means this step is unusable
        msg = (f"checkpoint at step {step} in {self.directory} is corrupted or incomplete "
               f"({type(e).__name__}: {str(e)[:200]}); moving it to {self.corrupt_dir} and trying the previous one")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log.warning(msg)
        self._quarantine(step)
    return None

  def _quarantine(self, step: int):
    if jax.process_index() != 0:
      return
    src = os.path.join(self.directory, str(step))
    if os.path.exists(src):
      os.makedirs(self.corrupt_dir, exist_ok=True)
      shutil.move(src, os.path.join(self.corrupt_dir, f"{step}-{int(time.time())}"))
    self.manager.reload()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
    if self.best is not None:
      self.best.close()
