"""Flamingo's gate metrics: tanh of every cross-attention gate, logged each step (the
family's `Task.param_metrics`) and drawn by `mmjax plot` (the paper's figure of tanh(alpha)
against the step)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

GATE_NAMES = ("attn_gate", "ff_gate")


def gate_values(params) -> dict[str, jax.Array]:
  """tanh of every `attn_gate` / `ff_gate` parameter, keyed `gate/<path>`.

  A scanned decoder (``scan_layers``) stacks its gates along a leading "layers" axis under
  ``blocks/xattn``; each slice is reported under the name the unrolled layout gives it
  (``.../xattn_{i}/attn_gate``), so metrics and plots read the same either way.
  """
  out = {}

  def walk(tree, prefix):
    if not hasattr(tree, "items"):
      return
    for key, value in tree.items():
      key = str(key)
      if key in GATE_NAMES and not hasattr(value, "items"):
        out["gate/" + "/".join(prefix + [key])] = jnp.mean(jnp.tanh(jnp.asarray(value, jnp.float32)))
      elif key == "blocks" and hasattr(value, "items") and "xattn" in value:
        size = sum(1 for k in value if str(k).startswith("layers_"))
        for name in GATE_NAMES:
          stacked = value["xattn"].get(name) if hasattr(value["xattn"], "get") else None
          if stacked is None:
            continue
          stacked = jnp.tanh(jnp.asarray(stacked, jnp.float32)).reshape(stacked.shape[0], -1)
          for g in range(stacked.shape[0]):
            out["gate/" + "/".join(prefix + [f"xattn_{g * size + size - 1}", name])] = jnp.mean(stacked[g])
      else:
        walk(value, prefix + [key])

  walk(params, [])
  return out
