"""The Pallas GPU kernels lower through Triton for CUDA on this CPU host, forward and backward.

``lower(lowering_platforms=("cuda",))`` runs Pallas's Triton lowering (jax.numpy in the
kernel -> Triton IR, block shapes checked) without a GPU; compiling that IR to PTX and
running it needs one, so speed and numerics on a GPU stay unverified here (the values are
checked in interpret mode, ``test_attention_kernels.py``).
"""

import contextlib

import jax
import jax.numpy as jnp

from mmjax.kernels.attention import attention


def _gpu_target():
  """Where Pallas reads the GPU to lower for. JAX 0.10 lowers with a default GPU when the host
  has none; from JAX 0.12 the target must be named: an abstract H100 on a one-device abstract
  mesh (an Explicit axis, as ``use_abstract_mesh`` requires at top level)."""
  if not hasattr(jax.sharding, "AbstractDevice"):
    return contextlib.nullcontext()
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device)
  return jax.sharding.use_abstract_mesh(mesh)


def test_pallas_gpu_kernels_lower_to_triton_with_window_alibi_segments_and_images():
  b, t, h, g, d, images, latents = 2, 256, 4, 2, 64, 3, 32
  bf16 = jnp.bfloat16

  def loss(q, k, v, lat_k, lat_v, segment_ids, image_index, image_ids, slopes):
    packed = attention(q, k, v, causal=True, query_segment_ids=segment_ids,
                       key_segment_ids=segment_ids, backend="pallas_gpu")
    cross = attention(q, lat_k, lat_v, query_image_index=image_index, key_image_ids=image_ids,
                      backend="pallas_gpu")
    windowed = attention(q, k, v, causal=True, sliding_window=100, alibi_slopes=slopes,
                         backend="pallas_gpu")
    return sum(jnp.sum(x.astype(jnp.float32)) for x in (packed, cross, windowed))

  args = (jax.ShapeDtypeStruct((b, t, h, d), bf16), jax.ShapeDtypeStruct((b, t, g, d), bf16),
          jax.ShapeDtypeStruct((b, t, g, d), bf16),
          jax.ShapeDtypeStruct((b, images * latents, g, d), bf16),
          jax.ShapeDtypeStruct((b, images * latents, g, d), bf16),
          jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.int32),
          jax.ShapeDtypeStruct((b, images * latents), jnp.int32),
          jax.ShapeDtypeStruct((h,), jnp.float32))
  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
  with _gpu_target():
    text = step.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  # Forward, dK/dV and dQ of each of the three attentions are Triton kernels.
  assert text.count("__gpu$xla.gpu.triton") == 9, text.count("__gpu$xla.gpu.triton")
