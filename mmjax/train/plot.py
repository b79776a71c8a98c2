"""`mmjax plot`: loss curves and, for a model that logs them, per-layer tanh gate values over
training, to a PNG.

The gate panel is the Flamingo paper's figure (tanh(alpha) of the attention and
feed-forward gates of every cross-attention layer against the step).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mmjax.train import metrics as metrics_lib  # noqa: E402


def plot(workdir: str, out: str) -> str:
  recs = metrics_lib.read_metrics(workdir)
  train = [r for r in recs if r["kind"] == "train" and isinstance(r.get("loss"), float)]
  evals = [r for r in recs if r["kind"] == "eval"]
  if not train:
    raise ValueError(f"{workdir!r} has no training metrics to plot")
  gates = sorted({k for r in train for k in r if k.startswith("gate/")})
  # The gate panel only for a model that logs gates (a family's `Task.param_metrics`).
  fig, axes = plt.subplots(1, 2 if gates else 1, figsize=(12 if gates else 6, 4.5), squeeze=False)
  ax_loss = axes[0][0]
  ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="train")
  if evals:
    ax_loss.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
  ax_loss.set(xlabel="step", ylabel="loss", title="loss", yscale="log")
  ax_loss.legend()
  if gates:
    ax_gate = axes[0][1]
    for name in gates:
      pts = [(r["step"], r[name]) for r in train if name in r]
      label = name[len("gate/"):].replace("decoder/", "")
      ax_gate.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.0,
                   ls="-" if name.endswith("attn_gate") else "--", label=label)
    ax_gate.axhline(0.0, color="grey", lw=0.5)
    ax_gate.set(xlabel="step", ylabel="tanh(gate)", title="gate values per layer (solid: attention, dashed: FFW)")
    ax_gate.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out
