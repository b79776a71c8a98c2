"""Scanned decoder layers (DecoderConfig.scan_layers): with the same weights (stack_layers
of the unrolled params) the scanned decoder and the whole Flamingo give the unrolled
model's logits, gradients and cached generation; the layouts convert exactly both ways;
labels and shardings see the stacked ``layers`` axis."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import sharding as sh
from mmjax.infer import Generator
from mmjax.families.flamingo import generation
from mmjax.families.flamingo.model import LABELS, Flamingo, param_labels
from mmjax.families.flamingo.model import stack_layers as flamingo_stack
from mmjax.families.flamingo.model import unstack_layers as flamingo_unstack
from mmjax.models import scan_layout
from mmjax.models.decoder import DecoderConfig
from tests.infer.util import micro_config, random_params
from tests.models import xdecoder

CONFIG = DecoderConfig(vocab_size=40, width=32, depth=4, num_heads=4, num_kv_heads=2, head_dim=8,
                       mlp_dim=48, max_length=32, rope_theta=1234.0)

# (cross_attn_every_n_layers, depth): plain LM, every layer, every 2nd, and a remainder.
CASES = [(0, 4), (1, 4), (2, 4), (2, 5)]


def _configs(n, depth, remat=False):
  unrolled = dataclasses.replace(CONFIG, depth=depth)
  return unrolled, dataclasses.replace(unrolled, scan_layers=True, remat=remat)


def stack_layers(params, config, n):
  return scan_layout.stack_layers(params, config.depth, xdecoder.insert(n))


def unstack_layers(params, config, n):
  return scan_layout.unstack_layers(params, config.depth, xdecoder.insert(n))


def _decoder_params(config, n, seed=0):
  """Random unrolled params (gates open, so the cross-attention matters)."""
  shapes = nn.unbox(xdecoder.init_shapes(
      config, n, jnp.zeros((1, 3), jnp.int32), image_index=jnp.zeros((1, 3), jnp.int32),
      media=jnp.zeros((1, 1, 2, 16), jnp.float32) if n else None))
  rng = np.random.default_rng(seed)
  def draw(leaf):
    fan_in = leaf.shape[0] if len(leaf.shape) > 1 else 1
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in) + 0.5 * (len(leaf.shape) == 1)
            ).astype(np.float32)
  return jax.tree.map(draw, shapes)


def _inputs(seed=1):
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(rng.integers(0, 40, (2, 7)), jnp.int32)
  image_index = jnp.asarray([[0, 1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1]], jnp.int32)
  media = jnp.asarray(rng.standard_normal((2, 2, 3, 16)), jnp.float32)
  return ids, image_index, media


def _leaves_close(a, b, atol):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


# (2, 5), the case with a remainder layer outside the scanned blocks, runs in the default tier;
# the others (each a separate compile of the unrolled and the scanned model) in the slow tier.
@pytest.mark.parametrize("n, depth", [c if c == (2, 5) else pytest.param(*c, marks=pytest.mark.slow) for c in CASES])
def test_scanned_decoder_gives_the_unrolled_logits_and_gradients(n, depth):
  unrolled, scanned = _configs(n, depth, remat=True)
  params = _decoder_params(unrolled, n)
  stacked = stack_layers(params, scanned, n)
  ids, image_index, media = _inputs()
  media = media if n else None
  image_index = image_index if n else None

  def loss_and_logits(config, p):
    def loss(p):
      logits, _ = xdecoder.apply(config, n, p, ids, image_index=image_index, media=media)
      return jnp.mean(jnp.square(logits)), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(p)

  (_, want_logits), want_grads = loss_and_logits(unrolled, params)
  (_, got_logits), got_grads = loss_and_logits(scanned, stacked)
  np.testing.assert_allclose(got_logits, want_logits, atol=1e-5, rtol=0)
  _leaves_close(unstack_layers(got_grads, scanned, n), want_grads, atol=1e-5)
  if n:
    assert "xattn" in stacked["params"]["blocks"]
    assert stacked["params"]["blocks"]["xattn"]["attn_gate"].shape == (depth // n, 1)
  plan = scan_layout.scan_plan(depth, xdecoder.insert(n))
  assert plan.remainder == tuple(range((depth // max(n, 1)) * max(n, 1), depth))
  assert set(stacked["params"]) >= {f"layers_{i}" for i in plan.remainder}


@pytest.mark.parametrize("n, depth", CASES)
def test_unstack_layers_inverts_stack_layers_exactly(n, depth):
  unrolled, scanned = _configs(n, depth)
  params = _decoder_params(unrolled, n)
  back = unstack_layers(stack_layers(params, scanned, n), scanned, n)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    assert type(x) is type(y) and x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("n, depth", CASES)
def test_stacked_tree_has_the_shapes_the_scanned_model_initialises(n, depth):
  unrolled, scanned = _configs(n, depth)
  ids, image_index, media = _inputs()
  want = nn.unbox(xdecoder.init_shapes(scanned, n, ids, image_index=image_index if n else None,
                                       media=media if n else None))
  got = stack_layers(_decoder_params(unrolled, n), scanned, n)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert [x.shape for x in jax.tree.leaves(got)] == [x.shape for x in jax.tree.leaves(want)]


@pytest.mark.parametrize("n, depth", [(2, 5)])
def test_scanned_cached_decoding_and_media_kv_give_the_unrolled_logits(n, depth):
  unrolled, scanned = _configs(n, depth)
  params = _decoder_params(unrolled, n)
  stacked = stack_layers(params, scanned, n)
  ids, image_index, media = _inputs()
  want, _ = xdecoder.apply(unrolled, n, params, ids, image_index=image_index, media=media)

  media_kv = xdecoder.media_kv(scanned, n, stacked, media)
  assert media_kv["blocks"]["key"].shape[0] == depth // n
  step = jax.jit(lambda ids, ii, pos, cache: xdecoder.apply(
      scanned, n, stacked, ids, image_index=ii, media_kv=media_kv, positions=pos, cache=cache))
  cache = xdecoder.cache(scanned, n, 2, 16)
  pos = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (2, 4))
  logits, cache = step(ids[:, :4], image_index[:, :4], pos, cache)
  steps = [logits]
  for t in range(4, 7):
    logits, cache = step(ids[:, t:t + 1], image_index[:, t:t + 1], jnp.full((2, 1), t, jnp.int32), cache)
    steps.append(logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), want, atol=2e-5, rtol=0)


def test_scanned_decoder_rejects_an_unrolled_cache():
  unrolled, scanned = _configs(2, 5)
  ids, image_index, media = _inputs()
  stacked = stack_layers(_decoder_params(unrolled, 2), scanned, 2)
  with pytest.raises(ValueError, match="cache has entries"):
    xdecoder.apply(scanned, 2, stacked, ids, image_index=image_index, media=media,
                   cache=xdecoder.cache(unrolled, 2, 2, 16))


@pytest.mark.slow  # the default tier keeps the scanned decoder [2-5] and scanned cached decoding with media
@pytest.mark.parametrize("n, depth", [(2, 5)])
def test_scanned_flamingo_gives_the_unrolled_logits_and_gradients(n, depth):
  config = micro_config(cross_attn_every_n_layers=n, depth=depth)
  scanned = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, scan_layers=True,
                                                                    remat=True))
  params = random_params(config)
  stacked = flamingo_stack(params, scanned)
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.integers(0, 256, (2, 1, 16, 16, 3)), jnp.uint8)
  ids = jnp.asarray(rng.integers(6, 64, (2, 6)), jnp.int32).at[:, 1].set(config.media_token_id)

  def run(cfg, p):
    def loss(p):
      logits = Flamingo(cfg).apply(p, images, ids)
      return jnp.mean(jnp.square(logits)), logits
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(p)

  (_, want), want_grads = run(config, params)
  (_, got), got_grads = run(scanned, stacked)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  _leaves_close(flamingo_unstack(got_grads, scanned), want_grads, atol=1e-5)


@pytest.mark.slow  # the default tier checks scanned cached decoding logit by logit
def test_scanned_flamingo_generates_the_unrolled_greedy_tokens():
  config = micro_config(cross_attn_every_n_layers=2, depth=5)
  scanned = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, scan_layers=True))
  params = random_params(config)
  rng = np.random.default_rng(4)
  images = rng.integers(0, 256, (2, 1, 16, 16, 3)).astype(np.uint8)
  prompt = rng.integers(6, 64, (2, 5)).astype(np.int32)
  prompt[:, 0] = config.media_token_id
  kwargs = dict(prompt_lengths=[5, 3], max_new_tokens=6)
  want = Generator(generation.decoding(config), prompt_buckets=(8,), length_buckets=(16,)).generate(
      params, {"images": images}, prompt, **kwargs)
  got = Generator(generation.decoding(scanned), prompt_buckets=(8,), length_buckets=(16,)).generate(
      flamingo_stack(params, scanned), {"images": images}, prompt, **kwargs)
  np.testing.assert_array_equal(got.tokens, want.tokens)
  np.testing.assert_array_equal(got.lengths, want.lengths)


def test_param_labels_of_stacked_params_match_the_layers_they_came_from():
  config = micro_config(cross_attn_every_n_layers=2, depth=5)
  scanned = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, scan_layers=True))
  params = random_params(config)
  # Labels as integer codes, so stack_layers can carry them to where each layer went.
  codes = jax.tree.map(lambda label: np.asarray(LABELS.index(label), np.int32), param_labels(params))
  want = flamingo_stack(codes, scanned)
  got = param_labels(flamingo_stack(params, scanned))
  assert jax.tree.structure(got) == jax.tree.structure(want, is_leaf=lambda x: isinstance(x, np.ndarray))
  for label, code in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert np.all(code == LABELS.index(label))
  flat = jax.tree_util.tree_flatten_with_path(got)[0]
  xattn = {jax.tree_util.keystr(p) for p, label in flat if label == "xattn"}
  assert xattn and all("'blocks']['xattn']" in p for p in xattn)


@pytest.mark.parametrize("rules", sorted(sh.RULE_SETS))
def test_stacked_kernels_keep_the_layers_axis_unsharded(rules):
  unrolled, scanned = _configs(2, 5)
  ids, image_index, media = _inputs()
  init = lambda cfg: xdecoder.init_shapes(cfg, 2, ids, image_index=image_index, media=media)["params"]
  mesh = sh.make_mesh({"fsdp": 4, "tensor": 2})
  got = sh.param_shardings(init(scanned), mesh, sh.get_rules(rules))
  want = sh.param_shardings(init(unrolled), mesh, sh.get_rules(rules))
  boxed = init(scanned)["blocks"]["layers_0"]["attn"]["query"]["kernel"]
  assert boxed.names == ("layers", "embed", "heads", "kv")
  assert nn.get_partition_spec(boxed)[0] == "layers"
  for name in ("layers_0", "layers_1"):
    for path in (("attn", "query", "kernel"), ("mlp", "down_proj", "kernel")):
      spec = _get(got["blocks"][name], path).spec
      # The layers axis unsharded, the others split as the unrolled layer's kernel.
      assert spec[0] is None
      assert tuple(spec[1:]) == tuple(_get(want[name], path).spec)
  assert got["blocks"]["xattn"]["attn"]["to_q"]["kernel"].spec[0] is None
  assert scan_layout.insert_layer_indices(scanned.depth, xdecoder.insert(2)) == (1, 3)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


@pytest.mark.parametrize("n,depth", [(1, 4), (2, 4), (2, 5)])
def test_gate_metrics_of_stacked_params_are_per_layer_under_the_unrolled_names(n, depth):
  from mmjax.families.flamingo.gates import gate_values
  unrolled, _ = _configs(n, depth)
  params = _decoder_params(unrolled, n, seed=3)["params"]
  indices = scan_layout.insert_layer_indices(depth, xdecoder.insert(n))
  # Distinct gate values per layer, so a mix-up of layers (or an average) cannot pass.
  for k, i in enumerate(indices):
    params[f"xattn_{i}"]["attn_gate"] = np.full((1,), 0.1 * (k + 1), np.float32)
    params[f"xattn_{i}"]["ff_gate"] = np.full((1,), -0.05 * (k + 1), np.float32)
  want = gate_values({"decoder": params})
  got = gate_values({"decoder": stack_layers(params, unrolled, n)})
  assert sorted(got) == sorted(want) == sorted(
      f"gate/decoder/xattn_{i}/{g}" for i in indices for g in ("attn_gate", "ff_gate"))
  for key in want:
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=0, atol=0, err_msg=key)
