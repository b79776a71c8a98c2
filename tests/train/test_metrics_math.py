"""CIDEr-D and the analytic FLOP count against hand-computed references."""

import collections
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import zoo
from mmjax.layers import embed
from mmjax.train import cider
from mmjax.families.flamingo import flops


def test_cider_gives_10_to_a_caption_equal_to_its_only_reference_when_no_ngram_is_shared():
  refs = [["a red circle on top"], ["two blue squares left of"], ["one green triangle with stripes"]]
  score, per = cider.cider_d([r[0] for r in refs], refs)
  np.testing.assert_allclose(per, [10.0, 10.0, 10.0])
  assert score == pytest.approx(10.0)


def test_cider_is_zero_without_overlap_and_punctuation_and_case_do_not_matter():
  refs = [["a red circle"], ["two blue squares"]]
  assert cider.cider_d(["green triangle", "yellow star"], refs)[1] == [0.0, 0.0]
  # Three words: uni-, bi- and tri-grams agree, there is no 4-gram: (1 + 1 + 1 + 0) / 4 * 10.
  assert cider.cider_d(["A Red circle.", "two, blue squares"], refs)[1] == pytest.approx([7.5, 7.5])


def _reference_cider_d(cands, refs, sigma=6.0):
  # A direct float64 transcription of Vedantam et al.'s definition, written independently.
  def grams(s, n):
    w = s.lower().replace(".", " ").split()
    return collections.Counter(tuple(w[i:i + n]) for i in range(len(w) - n + 1)), len(w)
  big_n = len(cands)
  out = []
  for c, rs in zip(cands, refs):
    total = 0.0
    for n in range(1, 5):
      df = collections.Counter()
      for rr in refs:
        df.update({g for r in rr for g in grams(r, n)[0]})
      idf = lambda g: math.log(big_n) - math.log(max(1.0, df[g]))
      gc, lc = grams(c, n)
      vc = {g: t * idf(g) for g, t in gc.items()}
      s = 0.0
      for r in rs:
        gr, lr = grams(r, n)
        vr = {g: t * idf(g) for g, t in gr.items()}
        num = sum(min(vc[g], vr[g]) * vr[g] for g in vc if g in vr)
        nc, nr = math.sqrt(sum(v * v for v in vc.values())), math.sqrt(sum(v * v for v in vr.values()))
        if nc and nr:
          num /= nc * nr
        s += num * math.exp(-((lc - lr) ** 2) / (2 * sigma * sigma))
      total += s / len(rs)
    out.append(total / 4 * 10)
  return out


def test_cider_matches_a_direct_transcription_of_the_definition_with_shared_ngrams():
  refs = [["a red circle and a blue square", "a red circle"], ["a blue square on the left"],
          ["there are 2 shapes: a red circle and a green triangle"], ["a green triangle"]]
  cands = ["a red circle and a square", "a blue square", "there are 2 shapes: a red circle", "a triangle"]
  np.testing.assert_allclose(cider.cider_d(cands, refs)[1], _reference_cider_d(cands, refs), rtol=1e-12)


def test_cider_rejects_a_candidate_without_references():
  with pytest.raises(ValueError, match="2 candidates but 1"):
    cider.cider_d(["a", "b"], [["a"]])


def test_flops_count_trainable_modules_three_times_and_a_frozen_vit_once():
  cfg = zoo.get("flamingo-tiny")
  fwd = flops.flamingo_forward_flops(cfg, num_images=1, text_length=32)
  every = frozenset({"vision", "resampler", "xattn", "lm"})
  forward = sum(sum(v) for k, v in fwd.items() if k != "order")
  assert flops.train_flops_per_example(fwd, every) == pytest.approx(3 * forward)
  # The Flamingo recipe: ViT frozen and nothing upstream of it -> x1; resampler, xattn x3;
  # LM layers below the first xattn block (layer 0, since xattn sits before layers 1, 3) x1,
  # the LM layers above it and the head x2.
  recipe = flops.train_flops_per_example(fwd, frozenset({"resampler", "xattn"}))
  lm = fwd["lm"]
  expected = (fwd["vision"][0] + 3 * fwd["resampler"][0] + 3 * sum(fwd["xattn"]) + lm[0] + 2 * sum(lm[1:]))
  assert recipe == pytest.approx(expected)
  assert len(fwd["xattn"]) == 2 and len(lm) == cfg.decoder.depth + 1


def test_flops_of_a_vit_layer_match_the_matmul_count_by_hand():
  cfg = zoo.get("flamingo-tiny")
  v = cfg.vision
  f1 = flops.flamingo_forward_flops(cfg, 1, 8)["vision"][0]
  f2 = flops.flamingo_forward_flops(cfg, 2, 8)["vision"][0]
  assert f2 == pytest.approx(2 * f1)
  p = (v.image_size // v.patch_size) ** 2 + 1
  layer = 2 * p * v.width * 4 * v.width + 4 * p * p * v.width + 4 * p * v.width * v.mlp_dim
  patch = 2 * (p - 1) * v.patch_size ** 2 * 3 * v.width
  assert f1 == pytest.approx(patch + v.depth * layer)


def test_flops_of_a_conv_stem_match_the_count_by_hand_and_xla_cost_analysis(monkeypatch):
  vision = dataclasses.replace(zoo.get("flamingo-tiny").vision, image_size=64, stem="conv")
  # 64 px, patch 8: three 3x3 stride-2 convolutions to 32x32x16, 16x16x32, 8x8x64, then a 1x1.
  convs = [(32, 3, 16), (16, 16, 32), (8, 32, 64)]  # (output side, channels in, out)
  by_hand = sum(2 * o * o * 9 * c_in * c_out for o, c_in, c_out in convs) + 2 * 8 * 8 * 64 * 64
  assert flops.stem_flops(vision) == by_hand
  # XLA's count leaves out the taps that fall on the zero padding (per axis only output 0's
  # first tap: 3 * o - 1 of 3 * o taps) and adds one flop per bias add; its exact GELU costs
  # ~50 flops per activation, so GELU is the identity here.
  monkeypatch.setattr(embed.nn, "gelu", lambda x, approximate: x)
  stem = embed.ConvStem(patch_size=8, width=64)
  pixels = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  params = jax.eval_shape(stem.init, jax.random.key(0), pixels)
  cost = jax.jit(stem.apply).lower(params, pixels).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  xla = (sum(2 * (3 * o - 1) ** 2 * c_in * c_out + o * o * c_out for o, c_in, c_out in convs)
         + 2 * 8 * 8 * 64 * 64 + 8 * 8 * 64)
  assert cost["flops"] == pytest.approx(xla, rel=1e-6)
  assert by_hand == pytest.approx(xla, rel=0.06)
