"""Shared layers against float64 numpy references: RMSNorm, LayerNorm, RoPE, SwiGLU, and
self-attention (GQA, RoPE) with and without its key/value cache."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.kernels import remat
from mmjax.layers.attention import Attention, init_cache
from mmjax.layers.mlp import SwiGLU
from mmjax.layers.norms import LayerNorm, RMSNorm
from mmjax.layers.posemb import rope

RNG = np.random.default_rng(0)


def _np_rope(x, positions, theta):
  """HF LLaMA's rotate_half RoPE in float64: x [B, T, H, K], positions [B, T]."""
  k = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, k, 2) / k)
  ang = positions[:, :, None, None] * np.concatenate([inv, inv])[None, None, None, :]
  rotated = np.concatenate([-x[..., k // 2:], x[..., : k // 2]], axis=-1)
  return x * np.cos(ang) + rotated * np.sin(ang)


def test_rms_norm_and_layer_norm_match_float64_numpy():
  x = RNG.standard_normal((2, 3, 16))
  params = {"params": {"scale": RNG.standard_normal(16), "bias": RNG.standard_normal(16)}}
  got = RMSNorm(eps=1e-6).apply({"params": {"scale": params["params"]["scale"]}}, jnp.asarray(x, jnp.float32))
  want = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * params["params"]["scale"]
  np.testing.assert_allclose(got, want, atol=1e-5)
  got = LayerNorm(eps=1e-5).apply(params, jnp.asarray(x, jnp.float32))
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  np.testing.assert_allclose(got, (x - mu) / np.sqrt(var + 1e-5) * params["params"]["scale"]
                             + params["params"]["bias"], atol=1e-5)


def test_rope_matches_hf_rotate_half_at_arbitrary_positions():
  x = RNG.standard_normal((2, 5, 3, 8))
  positions = RNG.integers(0, 1000, (2, 5))
  got = rope(jnp.asarray(x, jnp.float32), jnp.asarray(positions, jnp.int32), 500000.0)
  np.testing.assert_allclose(got, _np_rope(x, positions, 500000.0), atol=2e-4)


def test_swiglu_matches_numpy():
  x = RNG.standard_normal((2, 3, 8)).astype(np.float32)
  module = SwiGLU(mlp_dim=12)
  params = nn.unbox(module.init(jax.random.key(0), x))
  p = jax.tree.map(np.asarray, params["params"])
  gate, up = x @ p["gate_proj"]["kernel"], x @ p["up_proj"]["kernel"]
  want = (gate / (1 + np.exp(-gate)) * up) @ p["down_proj"]["kernel"]
  np.testing.assert_allclose(module.apply(params, x), want, atol=1e-5)


def test_gqa_attention_with_rope_matches_a_float64_reference_and_its_cache_gives_the_same_output():
  b, t, d, h, g, k = 2, 6, 16, 4, 2, 4
  x = RNG.standard_normal((b, t, d)).astype(np.float32)
  module = Attention(num_heads=h, head_dim=k, num_kv_heads=g, rope_theta=10000.0)
  params = nn.unbox(module.init(jax.random.key(1), x, causal=True))
  apply = jax.jit(module.apply, static_argnames="causal")
  out, _ = apply(params, x, causal=True)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  pos = np.broadcast_to(np.arange(t), (b, t))
  q = _np_rope(np.einsum("btd,dhk->bthk", x, p["query"]["kernel"]), pos, 10000.0)
  key = _np_rope(np.einsum("btd,dgk->btgk", x, p["key"]["kernel"]), pos, 10000.0)
  value = np.einsum("btd,dgk->btgk", x, p["value"]["kernel"])
  key, value = np.repeat(key, h // g, axis=2), np.repeat(value, h // g, axis=2)  # head i -> kv i // 2
  logits = np.einsum("bthk,bshk->bhts", q, key) / np.sqrt(k)
  logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = np.einsum("bhts,bshk,hkd->btd", probs, value, p["out"]["kernel"])
  np.testing.assert_allclose(out, want, atol=1e-5)

  cache = init_cache(b, 8, g, k)
  first, cache = apply(params, x[:, :4], causal=True, cache=cache)
  steps = [first]
  for i in range(4, t):
    y, cache = apply(params, x[:, i:i + 1], positions=jnp.full((b, 1), i, jnp.int32), cache=cache)
    steps.append(y)
  np.testing.assert_allclose(np.concatenate(steps, 1), out, atol=1e-5)


@pytest.mark.parametrize("scope", ["head", "width"])
def test_qk_norm_over_each_head_or_the_whole_width_matches_a_float64_reference(scope):
  # Persimmon normalises each head's K dims; MosaicGPT (OpenFlamingo-3B's MPT-1B) the H*K-wide
  # query and the G*K-wide key at once. Both with a perturbed scale and bias, GQA, causal.
  b, t, d, h, g, k = 2, 5, 24, 4, 2, 6
  layer = Attention(num_heads=h, head_dim=k, num_kv_heads=g, qk_norm=scope, qk_norm_eps=1e-5)
  x = jax.random.normal(jax.random.PRNGKey(0), (b, t, d))
  params = nn.unbox(layer.init(jax.random.PRNGKey(1), x, causal=True))["params"]
  rng = np.random.default_rng(0)
  for name in ("query_norm", "key_norm"):
    params[name] = {key: np.asarray(v) + 0.3 * rng.standard_normal(v.shape) for key, v in params[name].items()}
  got, _ = layer.apply({"params": params}, x, causal=True)
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
  x64 = np.asarray(x, np.float64)

  def ln(y, norm):
    shape = y.shape
    y = y.reshape(shape[:2] + (-1,)) if scope == "width" else y
    y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-5) * norm["scale"] + norm["bias"]
    return y.reshape(shape)

  q = ln(np.einsum("btd,dhk->bthk", x64, p["query"]["kernel"]), p["query_norm"])
  key = ln(np.einsum("btd,dgk->btgk", x64, p["key"]["kernel"]), p["key_norm"])
  v = np.einsum("btd,dgk->btgk", x64, p["value"]["kernel"])
  key, v = np.repeat(key, h // g, axis=2), np.repeat(v, h // g, axis=2)
  logits = np.einsum("bthk,bshk->bhts", q, key) / np.sqrt(k)
  logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want = np.einsum("bhsk,hkd->bsd", np.einsum("bhts,bshk->bthk", probs, v).transpose(0, 2, 1, 3),
                   p["out"]["kernel"])
  assert params["query_norm"]["scale"].shape == ((h * k,) if scope == "width" else (k,))
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


@pytest.mark.parametrize("features,axis,shape", [
    (12, -1, (2, 3, 8)),  # [B, T, D] -> [B, T, F]: merged to [6, 8]
    ((4, 3), -1, (2, 3, 5, 8)),  # [B, T, N, D] -> [B, T, N, H, K]
    (7, (-2, -1), (2, 3, 4, 8)),  # attention's output projection: [B, T, H, K] -> [B, T, D]
    (7, -1, (5, 8)),  # already 2-D: nothing to merge
    (7, 1, (2, 8, 3)),  # a middle axis named from the front: left as nn.DenseGeneral has it
])
def test_the_shared_dense_layer_is_nn_dense_general_with_its_leading_dimensions_merged(features, axis, shape):
  """`dense` merges the non-contracted leading dimensions around its product (an XLA:CPU
  layout matter); parameters, values and gradients are nn.DenseGeneral's, against float64."""
  from mmjax.layers import linear
  n_out = 1 if isinstance(features, int) else len(features)
  n_in = 1 if isinstance(axis, int) else len(axis)
  names = ("embed",) * n_in + ("mlp",) * n_out
  ours = linear.dense(features, names, axis=axis, use_bias=True)
  theirs = nn.DenseGeneral(features, axis=axis, use_bias=True)
  x = jnp.asarray(RNG.standard_normal(shape), jnp.float32)
  params = nn.unbox(ours.init(jax.random.key(0), x))
  reference = theirs.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, reference)
  kernel = np.asarray(params["params"]["kernel"], np.float64)
  bias = np.asarray(params["params"]["bias"], np.float64)
  axes = [a % len(shape) for a in ((axis,) if isinstance(axis, int) else axis)]
  expected = np.tensordot(np.asarray(x, np.float64), kernel, axes=(axes, list(range(n_in)))) + bias
  np.testing.assert_allclose(ours.apply(params, x), expected, rtol=1e-5, atol=1e-5)
  cotangent = jnp.asarray(RNG.standard_normal(expected.shape), jnp.float32)
  grad = lambda m: jax.grad(lambda p, x: jnp.sum(m.apply(p, x) * cotangent), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(grad(ours)), jax.tree.leaves(grad(theirs))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_projection_backward_is_custom_outside_remat_and_jax_own_inside():
  """Outside rematerialisation the kernel gradient is inputs^T . grad (a custom VJP, equal
  to nn.DenseGeneral's above); inside `linear.rematerialised()` the projection is a plain
  dot_general, so a checkpoint policy that saves dots (the decoder's) saves its product
  instead of recomputing it in the backward pass."""
  from mmjax.layers import linear
  layer = linear.dense(6, ("embed", "mlp"))
  x = jnp.ones((2, 3, 4), jnp.float32)
  params = nn.unbox(layer.init(jax.random.key(0), x))

  def loss(p, x):
    return jnp.sum(jnp.tanh(layer.apply(p, jnp.tanh(layer.apply(p, x[..., :4])[..., :4]))))

  def grad_jaxpr(inside: bool) -> str:
    policy = jax.checkpoint_policies.dots_saveable
    def traced(p, x):
      if inside:
        with linear.rematerialised():
          return jax.checkpoint(lambda p, x: loss(p, x), policy=policy)(p, x)
      return jax.checkpoint(lambda p, x: loss(p, x), policy=policy)(p, x)
    return str(jax.make_jaxpr(jax.grad(traced))(params, x))

  # A new function object for each trace: jax caches a function's trace by identity and
  # argument types, not by the context it was traced in.
  assert "custom_vjp_call" in str(jax.make_jaxpr(lambda p, x: loss(p, x))(params, x))
  with linear.rematerialised():
    assert "custom_vjp_call" not in str(jax.make_jaxpr(lambda p, x: loss(p, x))(params, x))
  outside, inside = grad_jaxpr(False), grad_jaxpr(True)
  # Two forward products saved; backward: both kernels' gradients and the second layer's
  # input gradient (x takes none): 5, no product recomputed.
  assert inside.count("dot_general[") == 5
  assert outside.count("dot_general[") > 5  # what the context exists to avoid
  with linear.rematerialised():
    pass
  assert not remat.active()
