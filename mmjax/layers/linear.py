"""Dense projections whose kernels carry logical axis names.

Every projection in mmjax is an ``nn.DenseGeneral`` whose kernel and bias are created
with ``nn.with_logical_partitioning``, so that a rule list (``mmjax.sharding``) can place
them on a mesh without the model knowing the mesh.

The projection multiplies 2-D matrices: the dimensions it does not contract ([B, T] of a
[B, T, D] activation) are merged into one before the product and split after it. The
parameters, their names and the result are those of ``nn.DenseGeneral``; what changes is the
compiled program. XLA:CPU copies a 3-D activation into a transposed layout before each
weight-gradient product and does not for a 2-D one (issue 20: one feed-forward block 21.5-23.2
ms with 3-D activations, 11.4-13.8 ms flattened, on 2 cores); docs/training.md has the
measured effect on a train run and on the TPU fit table.

Its backward pass computes the kernel's gradient as inputs^T . grad in the kernel's own
dimension order (`_contract`), where JAX's transpose rule computes grad^T . inputs and
transposes the result: XLA:CPU copies the large [tokens, features] gradient into a transposed
layout for the latter, not for the former. Under rematerialisation JAX's rule is kept
(`rematerialised`, `mmjax.kernels.remat`), so TPU programs compiled with remat are unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.kernels import remat
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _contract(inputs: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
  """[..., I...] x [I..., O...] -> [..., O...]: the last n_in input dimensions contracted with
  the first n_in of the kernel."""
  return jax.lax.dot_general(inputs, kernel, _contracting(inputs.ndim, n_in))


def _contracting(ndim: int, n_in: int):
  return (tuple(range(ndim - n_in, ndim)), tuple(range(n_in))), ((), ())


def _contract_fwd(inputs, kernel, n_in):
  return _contract(inputs, kernel, n_in), (inputs, kernel)


def _contract_bwd(n_in, residuals, grad):
  inputs, kernel = residuals
  lead = inputs.ndim - n_in
  # The kernel's gradient as inputs^T . grad, in the kernel's own dimension order. JAX's
  # transpose rule computes grad^T . inputs and transposes the small result; XLA:CPU then
  # copies the large grad into a transposed layout first (a [tokens, features] activation,
  # ~6.5 ms for 4 MiB on 2 cores) where this order lets it read both operands as they lie.
  d_kernel = jax.lax.dot_general(inputs, grad, ((tuple(range(lead)), tuple(range(lead))), ((), ())))
  d_inputs = jax.lax.dot_general(grad, kernel, ((tuple(range(lead, grad.ndim)), tuple(range(n_in, kernel.ndim))),
                                                ((), ())))
  return d_inputs.astype(inputs.dtype), d_kernel.astype(kernel.dtype)


_contract.defvjp(_contract_fwd, _contract_bwd)


# Projections traced inside keep JAX's own backward pass (mmjax.kernels.remat says why).
rematerialised = remat.rematerialised


def _dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """lax.dot_general, through `_contract` when it is a plain projection (trailing input
  dimensions against leading kernel dimensions, no batch dimensions, default precision)
  outside rematerialisation (`rematerialised`)."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  n = len(lhs_contract)
  plain = (not remat.active() and not lhs_batch and not rhs_batch and precision is None and preferred_element_type is None
           and tuple(a % lhs.ndim for a in lhs_contract) == tuple(range(lhs.ndim - n, lhs.ndim))
           and tuple(rhs_contract) == tuple(range(n)))
  if plain:
    return _contract(lhs, rhs, n)
  return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                             preferred_element_type=preferred_element_type)


class _Dense(nn.DenseGeneral):
  """nn.DenseGeneral with the non-contracted leading dimensions merged around the product."""

  def __call__(self, inputs):
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    n = len(axis)
    # Only trailing axes named from the end: a merge would renumber any other.
    if self.batch_dims or sorted(axis) != list(range(-n, 0)) or inputs.ndim - n < 2:
      return super().__call__(inputs)
    lead = inputs.shape[:inputs.ndim - n]
    out = super().__call__(inputs.reshape((-1,) + inputs.shape[inputs.ndim - n:]))
    return out.reshape(lead + out.shape[1:])


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
  """An nn.DenseGeneral (flattened around its product, above) with logically named kernel
  (in axes + out axes) and bias (out axes).

  ``kernel_axes`` names the contracted input dimensions followed by the output
  dimensions, e.g. ``("embed", "heads", "kv")`` for a query projection D -> H x K.
  """
  check_logical_axes(kernel_axes)
  n_out = 1 if isinstance(features, int) else len(features)
  # nn.DenseGeneral initialises a multi-axis kernel through a flattened 2-D shape, so
  # fan-in/fan-out are those of the flattened matrix, as in a torch nn.Linear.
  return _Dense(
      features=features,
      axis=axis,
      use_bias=use_bias,
      dtype=jnp.dtype(dtype),
      param_dtype=jnp.float32,
      kernel_init=_logical_init(kernel_init, kernel_axes),
      bias_init=_logical_init(bias_init, kernel_axes[-n_out:]),  # flat too, like the kernel
      dot_general=_dot_general,
      name=name,
  )
