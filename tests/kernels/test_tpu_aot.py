"""The Pallas TPU kernels compile for real TPUs, forward and backward, inside shard_map.

libtpu compiles on this CPU host for TPU topologies (``jax.experimental.topologies``);
Mosaic lowers the kernels exactly as on a TPU, so a tile shape or an operation that
Mosaic cannot lower fails here.
"""

import os

import numpy as np
import pytest

pytest.importorskip("libtpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from mmjax.kernels.attention import attention  # noqa: E402

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# Several test processes (pytest-xdist, other suites) may each load libtpu to compile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _mesh(topology: str) -> jax.sharding.Mesh:
  topology_desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
  devices = np.asarray(topology_desc.devices).reshape(2, 2)
  return jax.sharding.Mesh(devices, ("data", "tensor"),
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _loss(mesh, q, k, v, q_x, lat_k, lat_v, q_dec, cache_k, cache_v, segment_ids,
          image_index, image_ids, decode_position, alibi_slopes):
  """Sum of four attentions (packed causal GQA, Flamingo cross, decode, and causal GQA under
  a sliding window with ALiBi) through the API."""
  b, t = segment_ids.shape
  self_attn = attention(q, k, v, causal=True, query_segment_ids=segment_ids,
                        key_segment_ids=segment_ids, backend="pallas_tpu", mesh=mesh)
  cross_attn = attention(q_x, lat_k, lat_v, query_image_index=image_index,
                         key_image_ids=image_ids, backend="pallas_tpu", mesh=mesh)
  cache_len = cache_k.shape[1]
  positions = jnp.broadcast_to(jnp.arange(cache_len, dtype=jnp.int32), (b, cache_len))
  decode = attention(q_dec, cache_k, cache_v, causal=True, query_positions=decode_position,
                     key_positions=positions, backend="pallas_tpu", mesh=mesh)
  # A window of 300 positions: a query tile (128) meets 3 to 4 of the 8 key tiles (128).
  windowed = attention(q, k, v, causal=True, sliding_window=300, alibi_slopes=alibi_slopes,
                       backend="pallas_tpu", mesh=mesh)
  return sum(jnp.sum(x.astype(jnp.float32)) for x in (self_attn, cross_attn, decode, windowed))


@pytest.mark.tpu_aot
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_pallas_tpu_kernels_compile_forward_and_backward_for_tpu(topology):
  mesh = _mesh(topology)
  b, t, h, g, d = 4, 1024, 8, 2, 128
  images, latents, cache_len = 5, 64, 2048
  bf16 = jnp.bfloat16

  def arg(shape, dtype, *spec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec(*spec)))

  heads = ("data", None, "tensor", None)
  args = (
      arg((b, t, h, d), bf16, *heads), arg((b, t, g, d), bf16, *heads),
      arg((b, t, g, d), bf16, *heads),
      arg((b, t, h, d), bf16, *heads), arg((b, images * latents, h, d), bf16, *heads),
      arg((b, images * latents, h, d), bf16, *heads),
      arg((b, 1, h, d), bf16, *heads), arg((b, cache_len, g, d), bf16, *heads),
      arg((b, cache_len, g, d), bf16, *heads),
      arg((b, t), jnp.int32, "data"), arg((b, t), jnp.int32, "data"),
      arg((b, images * latents), jnp.int32, "data"), arg((b, 1), jnp.int32, "data"),
      arg((h,), jnp.float32, "tensor"),
  )
  step = jax.jit(jax.value_and_grad(lambda *a: _loss(mesh, *a), argnums=tuple(range(9))))
  compiled = step.lower(*args).compile()
  text = compiled.as_text()
  # The three kernels of each attention are Mosaic custom calls in the TPU program.
  assert text.count("tpu_custom_call") >= 12, text.count("tpu_custom_call")
  memory = compiled.memory_analysis()
  assert memory.argument_size_in_bytes > 0
