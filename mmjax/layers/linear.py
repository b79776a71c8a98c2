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
      kernel_init=nn.with_logical_partitioning(kernel_init, kernel_axes),
      bias_init=nn.with_logical_partitioning(bias_init, kernel_axes[-n_out:]),
      name=name,
  )
