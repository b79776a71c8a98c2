"""`HolderLock`: an `flock` on a file that also records who holds it; `atomic_write`: a
file written whole or not at all.

Used for what one process at a time may write: a work directory (`mmjax train`) and a
data directory (`mmjax data build | import`). The kernel drops an `flock` when its holder
dies, so a crash never leaves a lock behind; the JSON record in the file (host, pid,
start time, command) is only for messages, and a record left by a dead holder says whose
lock was taken over. A reader of a file written with `atomic_write` (a manifest, a
tokenizer, a work directory's record) never sees half of it. A leaf module: every package
may import it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys


class HolderLock:
  """An exclusive `flock` on `path`, with the holder written into the file."""

  def __init__(self, path: str, command: str | None = None):
    self.path = path
    self.command = command or " ".join(sys.argv) or "python"
    self._fd = None
    self.taken_over = None  # the previous holder's description, when it died holding the lock

  def holder(self) -> str:
    """Who holds (or last held) the lock, in words."""
    try:
      with open(self.path) as f:
        h = json.load(f)
      return f"pid {h['pid']} on host {h['host']} (started {h['started']}: {h.get('command', '?')})"
    except (OSError, ValueError, KeyError, TypeError):
      return "an unknown process"

  def acquire(self, *, blocking: bool) -> bool:
    """Takes the lock; without `blocking`, returns False at once if another process holds it."""
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
      os.close(fd)
      return False
    except BaseException:
      os.close(fd)
      raise
    if os.fstat(fd).st_size:
      self.taken_over = self.holder()
    record = {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    self._fd = fd
    return True

  def release(self) -> None:
    if self._fd is None:
      return
    # Empty the record first: a file still naming a holder after a clean exit would read
    # as a crash to the next process.
    with contextlib.suppress(OSError):
      os.ftruncate(self._fd, 0)
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None


def atomic_write(path: str, content: bytes) -> None:
  """Writes `path` whole or not at all: a temporary file of this process, synced, renamed over it."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(content)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
