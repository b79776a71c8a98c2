"""Whether the code being traced is rematerialised: custom backward passes step aside there.

mmjax gives some operations their own backward pass for XLA:CPU's sake (the projections'
kernel gradient in `mmjax.layers.linear`, the XLA attention's in
`mmjax.kernels.attention.reference`; issue 20, docs/training.md). A checkpoint policy
decides what to save by primitive (`dots_saveable` keeps the dot_general outputs) and cannot
see into a custom_vjp, so under `jax.checkpoint` such an operation would be recomputed in
the backward pass instead of saved (+0.5% FLOPs and a different memory profile for
OpenFlamingo-3B on v5e, for the projections). Every place that rematerialises (the
decoder's remat and scanned layers, the train step's remat policies) traces its body inside
`rematerialised()`, and the operations keep JAX's own differentiation there, so programs
compiled with remat (the TPU fit table) are unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_REMATERIALISED = contextvars.ContextVar("mmjax_rematerialised", default=False)


@contextlib.contextmanager
def rematerialised() -> Iterator[None]:
  """Operations traced inside keep JAX's own backward pass."""
  token = _REMATERIALISED.set(True)
  try:
    yield
  finally:
    _REMATERIALISED.reset(token)


def active() -> bool:
  """Whether the code being traced is inside `rematerialised`."""
  return _REMATERIALISED.get()
