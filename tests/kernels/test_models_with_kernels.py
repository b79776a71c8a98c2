"""The models run on the Pallas backends: the tiny Flamingo's logits equal the XLA
backend's (interpret mode), and the model's forward and backward with the Pallas TPU
backend compile for TPU topologies (Mosaic lowering included)."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import zoo
from mmjax.kernels.attention import force_interpret
from mmjax.families.flamingo.model import Flamingo
from tests.kernels.cases import rel_err

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# Several test processes (pytest-xdist, other suites) may each load libtpu to compile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _inputs(config, batch=2, length=16, images=2):
  """Images and token ids with text before the first <image> and two images per row."""
  rng = np.random.default_rng(0)
  size = config.vision.image_size
  pixels = jnp.asarray(rng.integers(0, 256, (batch, images, size, size, 3)), jnp.uint8)
  ids = rng.integers(10, config.decoder.vocab_size, (batch, length))
  ids[:, 3] = config.media_token_id
  ids[:, 9] = config.media_token_id
  return pixels, jnp.asarray(ids, jnp.int32)


def _random_params(config, pixels, ids):
  """Parameters drawn at random, gates included: at init the tanh gates are 0 and the
  cross-attention would not reach the logits."""
  shapes = nn.unbox(jax.eval_shape(Flamingo(config).init, jax.random.key(0), pixels, ids))
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(1)
  return jax.tree.unflatten(treedef, [
      jnp.asarray(rng.normal(0.0, 0.3, leaf.shape), leaf.dtype) for leaf in leaves])


@pytest.mark.slow  # about 2 minutes each on 2 cores: a dozen kernels in interpret mode
@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_tiny_flamingo_logits_with_a_pallas_backend_equal_the_xla_backend(backend):
  config = zoo.get("flamingo-tiny", attention_backend="xla")
  pixels, ids = _inputs(config)
  params = _random_params(config, pixels, ids)
  want = jax.jit(Flamingo(config).apply)(params, pixels, ids)
  with force_interpret():
    got = jax.jit(Flamingo(zoo.get("flamingo-tiny", attention_backend=backend)).apply)(
        params, pixels, ids)
  assert rel_err(got, want) <= 1e-5


@pytest.mark.tpu_aot
@pytest.mark.slow  # about 100 s per topology on 2 cores (a dozen Mosaic kernels)
@pytest.mark.parametrize("topology", ["v5e:2x2", "v6e:2x2"])
def test_flamingo_forward_and_backward_with_pallas_tpu_compile_for_tpu(topology):
  pytest.importorskip("libtpu")
  from jax.experimental import topologies
  from jax.sharding import NamedSharding, PartitionSpec

  devices = np.asarray(topologies.get_topology_desc(
      platform="tpu", topology_name=topology).devices).reshape(2, 2)
  mesh = jax.sharding.Mesh(devices, ("data", "tensor"),
                           axis_types=(jax.sharding.AxisType.Auto,) * 2)
  config = zoo.get("flamingo-tiny", attention_backend="pallas_tpu", dtype=jnp.bfloat16)
  model = Flamingo(config)
  pixels, ids = _inputs(config, batch=4, length=64)
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), pixels, ids))
  replicated = NamedSharding(mesh, PartitionSpec())
  by_batch = NamedSharding(mesh, PartitionSpec("data"))
  abstract = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

  def loss(params, pixels, ids):
    return jnp.mean(model.apply(params, pixels, ids))

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.value_and_grad(loss)).lower(
        jax.tree.map(lambda x: abstract(x, replicated), params),
        abstract(pixels, by_batch), abstract(ids, by_batch)).compile()
  # Vision, resampler, decoder self- and cross-attention: all Mosaic kernels.
  assert compiled.as_text().count("tpu_custom_call") >= 3 * 4


@pytest.mark.parametrize("backend", ["pallas_gpu", "pallas_tpu"])
def test_an_alibi_decoder_with_a_sliding_window_gives_the_xla_logits_on_a_pallas_backend(backend):
  # The decoder hands its ALiBi slopes and window to the kernels (issue 15's MPT and Mistral
  # fields, here at once), GQA, random weights.
  import dataclasses  # pylint: disable=g-import-not-at-top
  from mmjax.models.decoder import Decoder, DecoderConfig  # pylint: disable=g-import-not-at-top
  config = DecoderConfig(vocab_size=64, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64,
                         max_length=64, norm="layer", norm_bias=False, mlp="gelu", positions="alibi",
                         sliding_window=5, attention_backend="xla")
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 24)), jnp.int32)
  shapes = nn.unbox(jax.eval_shape(Decoder(config).init, jax.random.key(0), ids))
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(1)
  params = jax.tree.unflatten(treedef, [jnp.asarray(rng.normal(0.0, 0.3, x.shape), x.dtype) for x in leaves])
  want, _ = jax.jit(Decoder(config).apply)(params, ids)
  with force_interpret():
    got, _ = jax.jit(Decoder(dataclasses.replace(config, attention_backend=backend)).apply)(params, ids)
  assert rel_err(got, want) <= 1e-5
