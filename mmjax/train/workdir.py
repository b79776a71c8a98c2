"""Who owns a work directory, and whether a run may continue in it.

A work directory holds what a user cannot get back: checkpoints, metrics, the config a
run was started with and the files it depends on (its tokenizer). Three guards keep it:

- `TrainLock`: one training at a time. `WORKDIR/train.lock` is held with `flock` for the
  whole run (the kernel releases it when the holder dies, so a crash never leaves a lock
  that blocks the next run) and records the holder's host, pid and start time, which a
  refused second run names. A multi-process job holds it once, on process 0.
- `check_resume`: a run that finds a config in the directory compares it with its own.
  Fields that change how the model or its training is defined (model, optimizer, data,
  seed, ...) must match, or the run stops before touching anything and lists the fields;
  fields that only change logistics (`RESUMABLE_FIELDS`: step count, checkpoint, eval and
  logging cadence, mesh and sharding, data workers, the run a fresh start initialises from)
  may change on resume.
- `record_files`: files a run depends on are copied in at its first start and compared at
  every resume, so a tokenizer retrained in the data directory cannot silently change the
  meaning of the ids the checkpoints were trained on.

`start_over` moves everything a run wrote into `WORKDIR/previous/<time>/` (the
`--restart` flag): nothing is deleted. Readers (`mmjax eval`, `mmjax generate`) take no
lock and write nothing here except their own result file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import time
from collections.abc import Mapping

from mmjax import filelock
from mmjax.errors import MmjaxError

LOCK_FILE = "train.lock"
PREVIOUS_DIR = "previous"
# What a resume may change without `--allow-config-change`: none of these alter the model,
# the data or the optimisation (batches are the same for any number of workers, and a
# checkpoint restores onto any mesh).
RESUMABLE_FIELDS = ("train.num_steps", "train.nan_policy", "train.max_consecutive_skips", "train.remat",
                    "checkpoint", "eval", "log", "mesh", "sharding", "data.num_workers",
                    "data.max_consecutive_bad_records",
                    # Read only at a fresh start (step 0): a resume restores its own checkpoint.
                    "init.from_workdir")
# Never moved by `start_over`: the lock itself, earlier runs, the compilation cache.
_KEPT_BY_RESTART = (LOCK_FILE, PREVIOUS_DIR, "jax_cache")


class WorkdirLocked(MmjaxError):
  """Another training holds the work directory."""


class ConfigChanged(MmjaxError, ValueError):
  """A resume would change what the work directory's run is."""


def is_local(workdir: str) -> bool:
  return "://" not in workdir


def ensure_writable(workdir: str) -> None:
  """Creates `workdir` and proves a file can be written there, or raises OSError naming it.

  Run before anything is computed, so a read-only or full directory is found at once and
  not at the first checkpoint.
  """
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write-probe-{socket.gethostname()}-{os.getpid()}")
    with open(probe, "wb") as f:
      f.write(b"mmjax")
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    raise OSError(e.errno, f"work directory {workdir!r} is not writable ({os.strerror(e.errno or errno.EIO)})"
                  ) from None


class TrainLock:
  """Holds `WORKDIR/train.lock` for a training run (a context manager).

  Raises `WorkdirLocked` naming the holder if another live process holds it. A lock file
  left by a dead process (`kill -9`, a crash, a lost machine's restart on the same host)
  holds no `flock` and is taken over; `taken_over` then names the old holder.
  """

  def __init__(self, workdir: str, command: str = "mmjax train"):
    self._lock = filelock.HolderLock(os.path.join(workdir, LOCK_FILE), command)
    self.path = self._lock.path
    self.taken_over = None

  def __enter__(self) -> TrainLock:
    if not self._lock.acquire(blocking=False):
      raise WorkdirLocked(
          f"work directory {os.path.dirname(self.path)!r} is in use by another training: "
          f"{self._lock.holder()}. Wait for it to finish, stop it, or train into another --workdir")
    self.taken_over = self._lock.taken_over
    return self

  def __exit__(self, *exc):
    self._lock.release()


def _flatten(d: Mapping, prefix: str = "") -> dict[str, object]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping) and v:
      out.update(_flatten(v, key + "."))
    else:
      out[key] = tuple(v) if isinstance(v, list) else v
  return out


def _resumable(field: str) -> bool:
  return any(field == f or field.startswith(f + ".") for f in RESUMABLE_FIELDS)


def config_differences(recorded: Mapping, current: Mapping) -> list[tuple[str, object, object]]:
  """(field, recorded value, current value) for each field that a resume may not change."""
  a, b = _flatten(recorded), _flatten(current)
  missing = object()
  diffs = []
  for field in sorted(set(a) | set(b)):
    old, new = a.get(field, missing), b.get(field, missing)
    if old != new and not _resumable(field):
      diffs.append((field, "(absent)" if old is missing else old, "(absent)" if new is missing else new))
  return diffs


def check_resume(workdir: str, recorded: Mapping | None, current: Mapping, *, allow_change: bool) -> None:
  """Raises `ConfigChanged` if `current` differs from the work directory's `recorded` config
  in a field that defines the run (unless `allow_change`)."""
  if recorded is None or allow_change:
    return
  from mmjax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  diffs = config_differences(config_lib.upgrade(dict(recorded)), current)
  if not diffs:
    return
  shown = "; ".join(f"{f}: {old!r} -> {new!r}" for f, old, new in diffs[:12])
  more = f" (and {len(diffs) - 12} more)" if len(diffs) > 12 else ""
  raise ConfigChanged(
      f"work directory {workdir!r} holds a run with another config; this one changes {shown}{more}. "
      "Nothing was changed. Train into a new --workdir, or rerun with --restart to start over here (the "
      f"old run moves to {os.path.join(workdir, PREVIOUS_DIR)}/), or with --allow-config-change to "
      "resume its checkpoints under the new config")


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def record_files(workdir: str, files: Mapping[str, bytes], *, write: bool = True) -> None:
  """Copies each file into `workdir` at a run's first start (if `write`: process 0 of a
  job); at a resume, raises `ConfigChanged` if the run's version differs from the copy
  (nothing is overwritten)."""
  for name, content in files.items():
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path, "rb") as f:
        kept = f.read()
      if kept != content:
        raise ConfigChanged(
            f"{name} of this run (sha256 {sha256(content)[:12]}) is not the one work directory {workdir!r} "
            f"was trained with ({path}, sha256 {sha256(kept)[:12]}): the ids its checkpoints were trained on "
            "would change meaning. Nothing was changed. Train into a new --workdir, or resume with the "
            f"work directory's copy (the `mmjax train` command does: it reads {path})")
      continue
    if write:
      filelock.atomic_write(path, content)


def start_over(workdir: str) -> str | None:
  """Moves everything a run wrote in `workdir` into `workdir/previous/<time>/`; returns that
  folder (None when there was nothing to move). Nothing is deleted."""
  names = [n for n in sorted(os.listdir(workdir)) if n not in _KEPT_BY_RESTART and not n.startswith(".")]
  if not names:
    return None
  stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
  dest = os.path.join(workdir, PREVIOUS_DIR, stamp)
  suffix = 0
  while os.path.exists(dest):
    suffix += 1
    dest = os.path.join(workdir, PREVIOUS_DIR, f"{stamp}-{suffix}")
  os.makedirs(dest)
  for n in names:
    os.replace(os.path.join(workdir, n), os.path.join(dest, n))
  return dest
