"""The custom_vjp shared by the Pallas backends: forward kernel, saved residuals, backward kernels."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax


def make_flash(forward: Callable, backward: Callable) -> Callable:
  """``flash(cfg, q, k, v, query_ids, key_ids, slopes) -> out`` differentiable in q, k, v.

  ``forward(cfg, q, k, v, query_ids, key_ids, slopes) -> (out, lse)`` and
  ``backward(cfg, q, k, v, query_ids, key_ids, slopes, out, lse, dout) -> (dq, dk, dv)``.
  The integer ids get no cotangent, and neither do the ALiBi ``slopes`` (Float32[H] or
  None): they are constants of the model (MPT fixes them from the head count), so their
  cotangent is zero here; the API stops their gradient so that this is never wrong.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
  def flash(cfg, q, k, v, query_ids, key_ids, slopes):
    return forward(cfg, q, k, v, query_ids, key_ids, slopes)[0]

  def flash_fwd(cfg, q, k, v, query_ids, key_ids, slopes):
    out, lse = forward(cfg, q, k, v, query_ids, key_ids, slopes)
    return out, (q, k, v, query_ids, key_ids, slopes, out, lse)

  def flash_bwd(cfg, residuals, dout):
    q, k, v, query_ids, key_ids, slopes, out, lse = residuals
    dq, dk, dv = backward(cfg, q, k, v, query_ids, key_ids, slopes, out, lse, dout)
    return dq, dk, dv, None, None, None

  flash.defvjp(flash_fwd, flash_bwd)
  return flash
