"""An analytic count of the matmul FLOPs of a Flamingo train step, for MFU.

MaxText's convention (REFERENCE.md): sum every matmul (2·m·n·k) and attention
(4·B·S²·H·K, halved when causal); a trainable module counts x3 (forward, input gradient,
weight gradient), a frozen module that gradients pass through x2 (forward, input gradient),
a frozen module no gradient passes through (a frozen ViT under a frozen input) x1.
Gradients "pass through" a frozen module when a trainable parameter lies upstream of it:
the LM layers above the first cross-attention block in the Flamingo recipe, not the ViT.
"""

from __future__ import annotations

from mmjax.models.vit import stem_flops  # noqa: F401  (re-exported: the tests and docs name it here)


def _mult(trainable: bool, grad_passes: bool) -> int:
  return 3 if trainable else (2 if grad_passes else 1)


def flamingo_forward_flops(cfg, num_images: int, text_length: int) -> dict[str, list[float]]:
  """Per-example forward matmul FLOPs of each module, in forward order.

  Returns {'vision': [f], 'resampler': [f], 'lm': [per layer..., head], 'xattn': [per block]}
  plus the key 'order': a list of ('vision'|'resampler'|'xattn'|'lm', index) in the order
  data flows. `cfg` is a `FlamingoConfig`.
  """
  v, r, d = cfg.vision, cfg.resampler, cfg.decoder
  n, t = num_images, text_length
  grid = v.image_size // v.patch_size
  p = grid * grid + (1 if v.class_token else 0)
  dv = v.width
  vit_layer = 2 * p * dv * 3 * dv + 2 * p * dv * dv + 4 * p * p * dv + 2 * 2 * p * dv * v.mlp_dim
  vision = n * (stem_flops(v) + v.depth * vit_layer)
  inner_r, lat = r.num_heads * r.head_dim, r.num_latents
  res_layer = (2 * lat * r.width * inner_r + 2 * (p + lat) * r.width * 2 * inner_r + 2 * lat * inner_r * r.width
               + 4 * lat * (p + lat) * inner_r + 2 * 2 * lat * r.width * r.ff_mult * r.width)
  resampler = n * r.depth * res_layer
  w, hk, gk = d.width, d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
  lm_layer = (2 * t * w * hk + 2 * t * w * 2 * gk + 2 * t * hk * w + 4 * t * t * hk / 2
              + 3 * 2 * t * w * d.mlp_dim)
  head = 2 * t * w * d.vocab_size
  xk = cfg.xattn_num_heads * cfg.xattn_head_dim
  m = n * lat
  xattn_block = (2 * t * w * xk + 2 * m * r.width * 2 * xk + 2 * t * xk * w + 4 * t * m * xk
                 + 2 * 2 * t * w * cfg.xattn_ff_mult * w)
  every = cfg.cross_attn_every_n_layers
  order = [("vision", 0), ("resampler", 0)]
  n_x = 0
  for i in range(d.depth):
    if every and (i + 1) % every == 0:
      order.append(("xattn", n_x))
      n_x += 1
    order.append(("lm", i))
  order.append(("lm", d.depth))  # the output head
  return {"vision": [float(vision)], "resampler": [float(resampler)],
          "xattn": [float(xattn_block)] * n_x, "lm": [float(lm_layer)] * d.depth + [float(head)],
          "order": order}


def train_flops_per_example(fwd: dict, trainable: frozenset[str]) -> float:
  """Train-step matmul FLOPs per example under the freezing convention above."""
  media_grad = False  # a trainable parameter lies upstream in the media stream
  text_grad = "lm" in trainable  # the (possibly trainable) embedding starts the text stream
  total = 0.0
  for comp, i in fwd["order"]:
    f = fwd[comp][i]
    train = comp in trainable
    if comp in ("vision", "resampler"):
      total += _mult(train, media_grad) * f
      media_grad |= train
    elif comp == "xattn":
      total += _mult(train, media_grad or text_grad) * f
      text_grad |= train or media_grad
    else:
      total += _mult(train, text_grad) * f
      text_grad |= train
  return total
