"""Metric writers: JSONL and TensorBoard event files from process 0, and a progress line.

Every record is `{"step": s, "kind": "train"|"eval", name: value, ...}`, one JSON object a
line in `WORKDIR/metrics.jsonl`; the same scalars go to TensorBoard under `kind/name`
(`WORKDIR/tb`). A run that resumes appends; readers keep the last record of each
(kind, step), which is what a resumed run recomputed.
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
  """Writes scalars from process 0; other processes hold a writer that does nothing."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, progress_total: int = 0, print_every: int = 50):
    self.active = jax.process_index() == 0
    self.total = progress_total
    self.print_every = max(int(print_every), 1)
    self.tty = sys.stderr.isatty()
    self._jsonl = None
    self._tb = None
    if not self.active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, kind: str, scalars: dict[str, float]):
    if not self.active:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    rec = {"step": int(step), "kind": kind}
    rec.update({k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()})
    self._jsonl.write(json.dumps(rec) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in clean.items():
        self._tb.add_scalar(f"{kind}/{k}", v, step)

  def progress(self, step: int, scalars: dict[str, float]):
    """One status line: rewritten in place on a terminal, printed every `print_every` steps otherwise."""
    if not self.active or (not self.tty and step % self.print_every and step != self.total - 1):
      return
    keys = [k for k in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu") if k in scalars]
    body = " ".join(f"{k}={scalars[k]:.4g}" for k in keys)
    line = f"step {step}/{self.total} {body}"
    if self.tty:
      sys.stderr.write("\r" + line[:150].ljust(150))
      sys.stderr.flush()
    else:
      print(line, flush=True)

  def close(self):
    if self.active:
      if self.tty:
        sys.stderr.write("\n")
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """All records of `metrics.jsonl`, the last one of each (kind, step), sorted by step."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    raise ValueError(f"{workdir!r} has no {METRICS_FILE}; expected a work directory written by `mmjax train`")
  latest = {}
  with open(path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut by a killed process
      latest[(rec["kind"], rec["step"])] = rec
  return sorted(latest.values(), key=lambda r: (r["step"], r["kind"]))
