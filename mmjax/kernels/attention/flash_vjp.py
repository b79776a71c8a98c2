"""The custom_vjp shared by the Pallas backends: forward kernel, saved residuals, backward kernels."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax


def make_flash(forward: Callable, backward: Callable) -> Callable:
  """``flash(cfg, q, k, v, query_ids, key_ids) -> out`` differentiable in q, k, v.

  ``forward(cfg, q, k, v, query_ids, key_ids) -> (out, lse)`` and
  ``backward(cfg, q, k, v, query_ids, key_ids, out, lse, dout) -> (dq, dk, dv)``; the
  integer ids get no cotangent.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def flash(cfg, q, k, v, query_ids, key_ids):
    return forward(cfg, q, k, v, query_ids, key_ids)[0]

  def flash_fwd(cfg, q, k, v, query_ids, key_ids):
    out, lse = forward(cfg, q, k, v, query_ids, key_ids)
    return out, (q, k, v, query_ids, key_ids, out, lse)

  def flash_bwd(cfg, residuals, dout):
    q, k, v, query_ids, key_ids, out, lse = residuals
    dq, dk, dv = backward(cfg, q, k, v, query_ids, key_ids, out, lse, dout)
    return dq, dk, dv, None, None

  flash.defvjp(flash_fwd, flash_bwd)
  return flash
