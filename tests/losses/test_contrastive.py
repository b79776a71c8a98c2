"""Contrastive losses over 8 CPU devices (tests/conftest.py) give the dense single-device
references' value and gradients, and the chunked SigLIP loss holds far less memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import sharding
from mmjax.losses import contrastive

MESHES = [{"data": 8}, {"data": 2, "fsdp": 4}, {"fsdp": 4, "tensor": 2}]


def _embeddings(batch: int, width: int, seed: int = 0):
  image_key, text_key = jax.random.split(jax.random.key(seed))
  normalise = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return (normalise(jax.random.normal(image_key, (batch, width))),
          normalise(jax.random.normal(text_key, (batch, width))))


def _value_and_grads(loss, args, **kwargs):
  fn = lambda *a: loss(*a, **kwargs)
  return jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(args)))))(*args)


def _assert_close(got, want):
  value, grads = got
  want_value, want_grads = want
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for g, w in zip(grads, want_grads):
    # Relative to the largest entry: entries near zero differ only by summation order.
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(w))))


SOFTMAX = (contrastive.softmax_contrastive_loss, contrastive.softmax_contrastive_loss_reference)
SIGMOID = (contrastive.sigmoid_contrastive_loss, contrastive.sigmoid_contrastive_loss_reference)


@pytest.mark.parametrize("mesh_config", MESHES, ids=str)
@pytest.mark.parametrize("loss,reference", [SOFTMAX, SIGMOID], ids=["softmax", "sigmoid"])
def test_sharded_loss_equals_the_dense_reference_in_value_and_gradients(mesh_config, loss, reference):
  image, text = _embeddings(64, 32)
  args = (image, text, jnp.float32(np.log(10.0)))
  if loss is contrastive.sigmoid_contrastive_loss:
    args += (jnp.float32(-10.0),)
  mesh = sharding.make_mesh(mesh_config)
  _assert_close(_value_and_grads(loss, args, mesh=mesh), _value_and_grads(reference, args))


def test_gathered_sigmoid_equals_the_reference_too():
  image, text = _embeddings(64, 32, seed=1)
  args = (image, text, jnp.float32(np.log(10.0)), jnp.float32(-10.0))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
  _assert_close(_value_and_grads(contrastive.sigmoid_contrastive_loss, args, mesh=mesh, chunked=False),
                _value_and_grads(contrastive.sigmoid_contrastive_loss_reference, args))


def test_the_mesh_in_context_is_used_and_one_device_gives_the_reference():
  image, text = _embeddings(16, 8, seed=2)
  args = (image, text, jnp.float32(2.0), jnp.float32(-5.0))
  reference = contrastive.sigmoid_contrastive_loss_reference(*args)
  with jax.set_mesh(sharding.make_mesh({"data": 8})):
    sharded = jax.jit(contrastive.sigmoid_contrastive_loss)(*args)
  single = contrastive.sigmoid_contrastive_loss(*args, mesh=sharding.make_mesh({"data": 1},
                                                                              jax.devices()[:1]))
  np.testing.assert_allclose(sharded, reference, rtol=1e-5)
  np.testing.assert_allclose(single, reference, rtol=1e-6)


def test_known_values_match_the_formulas():
  """Perfectly aligned orthogonal pairs: CLIP's loss is log(1 + (B-1) e^-t); SigLIP's is
  -(log s(t + b) + (B-1) log s(-b)) per row, with s the sigmoid."""
  batch, t, b = 4, 5.0, -2.0
  eye = jnp.eye(batch, dtype=jnp.float32)
  clip = contrastive.softmax_contrastive_loss_reference(eye, eye, jnp.float32(np.log(t)))
  np.testing.assert_allclose(clip, np.log1p((batch - 1) * np.exp(-t)), rtol=1e-5)  # float32 logsumexp
  siglip = contrastive.sigmoid_contrastive_loss_reference(eye, eye, jnp.float32(np.log(t)), jnp.float32(b))
  log_sigmoid = lambda v: -np.log1p(np.exp(-v))
  np.testing.assert_allclose(siglip, -(log_sigmoid(t + b) + (batch - 1) * log_sigmoid(-b)), rtol=1e-6)


@pytest.mark.parametrize("loss", [contrastive.softmax_contrastive_loss,
                                  contrastive.sigmoid_contrastive_loss], ids=["softmax", "sigmoid"])
def test_a_batch_indivisible_by_the_devices_is_refused_naming_both(loss):
  image, text = _embeddings(12, 8)
  args = (image, text, jnp.float32(1.0)) + ((jnp.float32(0.0),) if loss is contrastive.sigmoid_contrastive_loss else ())
  with pytest.raises(ValueError, match=r"global batch 12 is not divisible by the 8 devices"):
    loss(*args, mesh=sharding.make_mesh({"data": 2, "fsdp": 4}))


def _temp_bytes(fn, batch: int, width: int) -> int:
  mesh = sharding.make_mesh({"data": 8})
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data",)))
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  args = (jax.ShapeDtypeStruct((batch, width), jnp.float32, sharding=rows),) * 2 + (scalar, scalar)
  grad = jax.jit(jax.grad(lambda *a: fn(*a, mesh), argnums=(0, 1, 2, 3)))
  return grad.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunked_sigmoid_needs_far_less_temporary_memory_than_the_gathered_one():
  chunked = _temp_bytes(lambda *a: contrastive.sigmoid_contrastive_loss(*a[:4], mesh=a[4]), 1024, 64)
  gathered = _temp_bytes(lambda *a: contrastive.sigmoid_contrastive_loss(*a[:4], mesh=a[4], chunked=False),
                         1024, 64)
  assert gathered >= 4 * chunked, (chunked, gathered)
