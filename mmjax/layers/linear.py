"""Dense projections whose kernels carry logical axis names.

Every projection in mmjax is an ``nn.DenseGeneral`` whose kernel and bias are created
with ``nn.with_logical_partitioning``, so that a rule list (``mmjax.sharding``) can place
them on a mesh without the model knowing the mesh.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from mmjax.sharding import check_logical_axes

default_kernel_init = nn.initializers.lecun_normal()


class _FlatKernelBox(nn.LogicallyPartitioned):
  """A LogicallyPartitioned whose unbox skips the constraint while ranks disagree.

  nn.DenseGeneral builds a multi-axis kernel flat ([in, out]) and unboxes it to reshape
  it; with a mesh in context (mmjax.sharding.activation_rules) unbox() would constrain
  the rank-2 flat kernel with the rank-3 names and fail (flax 0.12.8). Parameters are
  placed by jit's in_shardings, so that constraint is not needed. (Added by the scale
  issue: sharded steps trace the model under a mesh.)
  """

  def unbox(self, apply_constraint=True):
    rank_ok = len(getattr(self.value, "shape", ())) == len(self.names)
    return super().unbox(apply_constraint=apply_constraint and rank_ok)


def _logical_init(init, names):
  def wrapper(*args, **kwargs):
    return _FlatKernelBox(init(*args, **kwargs), names)
  return wrapper


def dense(
    features: int | Sequence[int],
    kernel_axes: tuple[str | None, ...],
    *,
    axis: int | Sequence[int] = -1,
    use_bias: bool = False,
    dtype: str | jnp.dtype = jnp.float32,
    kernel_init=default_kernel_init,
    bias_init=nn.initializers.zeros,
    name: str | None = None,
) -> nn.DenseGeneral:
  """An nn.DenseGeneral with logically named kernel (in axes + out axes) and bias (out axes).

  ``kernel_axes`` names the contracted input dimensions followed by the output
  dimensions, e.g. ``("embed", "heads", "kv")`` for a query projection D -> H x K.
  """
  check_logical_axes(kernel_axes)
  n_out = 1 if isinstance(features, int) else len(features)
  # nn.DenseGeneral initialises a multi-axis kernel through a flattened 2-D shape, so
  # fan-in/fan-out are those of the flattened matrix, as in a torch nn.Linear.
  return nn.DenseGeneral(
      features=features,
      axis=axis,
      use_bias=use_bias,
      dtype=jnp.dtype(dtype),
      param_dtype=jnp.float32,
      kernel_init=_logical_init(kernel_init, kernel_axes),
      bias_init=_logical_init(bias_init, kernel_axes[-n_out:]),  # flat too, like the kernel
      name=name,
  )
