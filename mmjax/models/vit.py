"""Vision Transformer towers (CLIP, SigLIP and friends): the module, its config and presets.

``VisionTransformer(config)(images)`` maps normalised images to the tokens of one layer;
``VisionTransformer.features`` also returns every block's output and a pooled vector (CLIP's
post-normed CLS token, SigLIP's attention-pooling head), which the HF parity tests need.
``normalize_images`` turns uint8 (or [0, 1] float) pixels into the tower's input.

Parameter tree (all float32)::

  patch_embed {kernel [p, p, 3, D], bias [D] if patch_bias}
  cls_token [D]                             if class_token
  pos_embedding [(1 +) P, D]                if posemb == 'learned' (CLS row first, as HF)
  pre_norm {scale, bias}                    if pre_norm
  layers_{i} {norm1, attn {query, key, value, out}, norm2, mlp {fc1, fc2}}
  post_norm {scale, bias}                   if post_norm
  head {probe [1, D], query, key, value, out, norm, mlp {fc1, fc2}}         if map_head

Dimension letters: B batch, H/W pixels, P patches (+1 with a CLS token), D width, h heads,
K head dim.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.layers.attention import Attention, dot_product_attention
from mmjax.layers.embed import ConvStem, PatchEmbed, conv_stem_channels
from mmjax.layers.linear import dense
from mmjax.layers.mlp import ACTIVATIONS, Mlp
from mmjax.layers.norms import LayerNorm
from mmjax.layers.posemb import sincos_2d


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  # Input resolution the position embeddings are laid out for (square images).
  image_size: int = 224
  # Side of a square patch, in pixels.
  patch_size: int = 14
  # Token width D.
  width: int = 1024
  # Number of transformer blocks.
  depth: int = 24
  num_heads: int = 16
  # Hidden width of each block's MLP.
  mlp_dim: int = 4096
  # Prepend a learned CLS token (CLIP yes, SigLIP no).
  class_token: bool = True
  # 'learned' (interpolated when the resolution differs) or 'sincos2d'.
  posemb: str = "learned"
  # LayerNorm before the first block (CLIP's pre_layrnorm).
  pre_norm: bool = True
  # LayerNorm after the last block.
  post_norm: bool = True
  # Whether post_norm applies to the tokens ``__call__`` returns (HF CLIP, open_clip >= 2.23),
  # or only to the pooled vector (False: open_clip < 2.23 returned its patch tokens without
  # ln_post, and OpenFlamingo's released checkpoints were trained on those; docs/models.md).
  post_norm_tokens: bool = True
  # 'quick_gelu' (OpenAI CLIP), 'gelu_tanh' (SigLIP) or 'gelu'.
  activation: str = "quick_gelu"
  # Bias in the patch-embedding convolution (CLIP: no, SigLIP: yes).
  patch_bias: bool = False
  # 'patch': one patch-sized, patch-strided convolution (every pretrained tower);
  # 'conv': log2(patch_size) strided 3x3 convolutions (mmjax.layers.embed.ConvStem, Xiao
  # et al. 2021), for towers trained from scratch: they learn shapes far sooner.
  stem: str = "patch"
  norm_eps: float = 1e-5
  # Which block's output is returned: -1 the last, -2 the penultimate (BLIP-2, LLaVA).
  output_layer: int = -1
  # Per-channel normalisation applied to uint8 pixels scaled to [0, 1].
  image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
  image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
  # Compute dtype of activations and matmuls; parameters stay float32.
  dtype: str = "float32"
  # mmjax.kernels.attention.AttentionBackend value, or None for the platform default.
  attention_backend: str | None = None
  # SigLIP's multihead-attention pooling head (a learned probe attending over the post-normed
  # tokens, then a residual MLP); its output is `pooled`. It does not change the tokens.
  map_head: bool = False

  @property
  def grid_size(self) -> int:
    """Patches per side at the native resolution."""
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    """Tokens per image at the native resolution, CLS included."""
    return self.grid_size**2 + int(self.class_token)

  def validate(self) -> "ViTConfig":
    """Returns self, or raises ValueError naming the first inconsistent field."""
    if self.image_size < self.patch_size:
      raise ValueError(f"image_size={self.image_size} is smaller than patch_size={self.patch_size}")
    if self.width % self.num_heads:
      raise ValueError(f"width={self.width} is not a multiple of num_heads={self.num_heads}")
    if self.stem not in ("patch", "conv"):
      raise ValueError(f"stem={self.stem!r}, expected 'patch' or 'conv'")
    if self.stem == "conv":
      conv_stem_channels(self.patch_size, self.width)  # raises unless a power of 2
    if self.posemb not in ("learned", "sincos2d"):
      raise ValueError(f"posemb={self.posemb!r}, expected 'learned' or 'sincos2d'")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation={self.activation!r}, expected one of {sorted(ACTIVATIONS)}")
    if not -self.depth <= self.output_layer <= -1:
      raise ValueError(f"output_layer={self.output_layer}, expected -1 (last block) down to "
                       f"-{self.depth} (first block) for depth={self.depth}")
    return self


# ------------------------------------------------------------------------------ presets

# OpenAI CLIP ViT-L/14 (HF openai/clip-vit-large-patch14; OpenFlamingo's vision encoder):
# 303,179,776 parameters, as HF CLIPVisionModel counts them.
CLIP_VIT_L14 = ViTConfig(
    image_size=224, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096,
    class_token=True, posemb="learned", pre_norm=True, post_norm=True, activation="quick_gelu",
    patch_bias=False, norm_eps=1e-5)

# The same tower fine-tuned at 336 px (openai/clip-vit-large-patch14-336; LLaVA-1.5).
CLIP_VIT_L14_336 = dataclasses.replace(CLIP_VIT_L14, image_size=336)

# SigLIP So400m/14 (google/siglip-so400m-patch14-224) with its attention-pooling head:
# 427,680,704 parameters, as HF SiglipVisionModel counts them.
SIGLIP_SO400M_14 = ViTConfig(
    image_size=224, patch_size=14, width=1152, depth=27, num_heads=16, mlp_dim=4304,
    class_token=False, posemb="learned", pre_norm=False, post_norm=True, activation="gelu_tanh",
    patch_bias=True, norm_eps=1e-6, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
    map_head=True)

# google/siglip-so400m-patch14-384 (27x27 patches): 428,225,600 parameters.
SIGLIP_SO400M_14_384 = dataclasses.replace(SIGLIP_SO400M_14, image_size=384)

# A CLIP-shaped tower small enough for CPU tests (8x8 patches of 4 px).
VIT_TINY = ViTConfig(
    image_size=32, patch_size=4, width=64, depth=2, num_heads=4, mlp_dim=128,
    class_token=True, posemb="learned", pre_norm=True, post_norm=True, activation="quick_gelu",
    patch_bias=False, norm_eps=1e-5)

PRESETS: dict[str, ViTConfig] = {
    "clip-vit-l14": CLIP_VIT_L14,
    "clip-vit-l14-336": CLIP_VIT_L14_336,
    "siglip-so400m-14": SIGLIP_SO400M_14,
    "siglip-so400m-14-384": SIGLIP_SO400M_14_384,
    "vit-tiny": VIT_TINY,
}


# ------------------------------------------------------------------------------ inputs

def normalize_images(images, config: ViTConfig) -> jax.Array:
  """Float32[..., H, W, 3] tower input from uint8 pixels (0..255) or floats in [0, 1].

  (x - mean) / std per channel, as the CLIP / SigLIP image processors do after rescaling.
  """
  images = jnp.asarray(images)
  if images.ndim < 3 or images.shape[-1] != 3:
    raise ValueError(f"images have shape {images.shape}, expected [..., H, W, 3] (RGB, channels last)")
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32) / jnp.float32(255.0)
  elif jnp.issubdtype(images.dtype, jnp.floating):
    x = images.astype(jnp.float32)
  else:
    raise ValueError(f"images have dtype {images.dtype}, expected uint8 (0..255) or float ([0, 1])")
  shape = (1,) * (x.ndim - 1) + (3,)
  mean = jnp.asarray(config.image_mean, jnp.float32).reshape(shape)
  std = jnp.asarray(config.image_std, jnp.float32).reshape(shape)
  return (x - mean) / std


def _check_images(images: jax.Array, config: ViTConfig) -> None:
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images have shape {images.shape}, expected [B, H, W, 3]")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images have dtype {images.dtype}, expected floats normalised by "
                     "normalize_images (uint8 pixels must be normalised first)")
  _, h, w, _ = images.shape
  if h < config.patch_size or w < config.patch_size:
    raise ValueError(f"image size {h}x{w} is smaller than the patch size {config.patch_size}")


# ------------------------------------------------------------------------------ posembs

def _torch_bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """[n_out, n_in] weights of torch's F.interpolate(mode='bicubic', align_corners=False) on one axis.

  torch (hence HF CLIP/SigLIP ``interpolate_pos_encoding``, open_clip and timm) uses the
  cubic convolution with a = -0.75, samples at (i + 0.5) * n_in / n_out - 0.5 and clamps
  taps at the border, without antialiasing; jax.image.resize (a = -0.5, antialiased when
  shrinking) gives other numbers, so checkpoints trained in torch are resized this way.
  """
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  m = np.zeros((n_out, n_in), np.float64)
  for i in range(n_out):
    src = (i + 0.5) * n_in / n_out - 0.5
    x0 = int(np.floor(src))
    t = src - x0
    for tap, w in zip(range(x0 - 1, x0 + 3), (far(t + 1), near(t), near(1 - t), far(2 - t))):
      m[i, min(max(tap, 0), n_in - 1)] += w
  return m


def resize_posemb(posemb: jax.Array, new_grid: tuple[int, int]) -> jax.Array:
  """Learned embeddings [h * w, D] of a square grid resized to new_grid, as torch's bicubic does.

  Returns [new_h * new_w, D], row-major; the embeddings themselves when the grid is unchanged.
  """
  n, d = posemb.shape
  side = int(round(n**0.5))
  if side * side != n:
    raise ValueError(f"posemb has {n} positions, expected a square grid")
  if (side, side) == tuple(new_grid):
    return posemb
  rows = jnp.asarray(_torch_bicubic_matrix(side, new_grid[0]), jnp.float32)
  cols = jnp.asarray(_torch_bicubic_matrix(side, new_grid[1]), jnp.float32)
  grid = posemb.astype(jnp.float32).reshape(side, side, d)
  out = jnp.einsum("Yh,hwD,Xw->YXD", rows, grid, cols, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(new_grid[0] * new_grid[1], d).astype(posemb.dtype)


# ------------------------------------------------------------------------------ modules

class EncoderBlock(nn.Module):
  """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)). [B, P, D] -> same."""

  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    ln = lambda name: LayerNorm(eps=cfg.norm_eps, dtype=cfg.dtype, name=name)  # noqa: E731
    y, _ = Attention(
        num_heads=cfg.num_heads, head_dim=cfg.width // cfg.num_heads, use_bias=True,
        dtype=cfg.dtype, backend=cfg.attention_backend, name="attn")(ln("norm1")(x))
    x = x + y
    x = x + Mlp(cfg.mlp_dim, activation=cfg.activation, dtype=cfg.dtype, name="mlp")(ln("norm2")(x))
    return nn.with_logical_constraint(x, ("batch", "patches", "embed"))


class MapHead(nn.Module):
  """SigLIP's attention pooling: a learned probe attends over [B, P, D] tokens -> [B, D].

  torch.nn.MultiheadAttention's packed in_proj becomes ``query``/``key``/``value``.
  """

  config: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    b, _, d = x.shape
    h, k = cfg.num_heads, cfg.width // cfg.num_heads
    probe = self.param(
        "probe", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), (None, "embed")),
        (1, d), jnp.float32)
    probe = jnp.broadcast_to(probe.astype(jnp.dtype(cfg.dtype))[None], (b, 1, d))
    proj = lambda name: dense((h, k), ("embed", "heads", "kv"), use_bias=True, dtype=cfg.dtype, name=name)  # noqa: E731
    q, key, value = proj("query")(probe), proj("key")(x), proj("value")(x)
    out = dot_product_attention(q, key, value, backend=cfg.attention_backend)
    y = dense(d, ("heads", "kv", "embed"), axis=(-2, -1), use_bias=True, dtype=cfg.dtype, name="out")(out)
    y = y + Mlp(cfg.mlp_dim, activation=cfg.activation, dtype=cfg.dtype, name="mlp")(
        LayerNorm(eps=cfg.norm_eps, dtype=cfg.dtype, name="norm")(y))
    return y[:, 0]


class VisionTransformer(nn.Module):
  """ViT tower: Float[B, H, W, 3] normalised images -> Float[B, P(+1 if class_token), D].

  ``__call__`` returns the tokens of ``config.output_layer`` (post-normed when
  ``config.post_norm`` and ``config.post_norm_tokens``); every block and the pooling head are still built (and their
  parameters created), and jit drops the computation the output does not need.
  Images at another resolution than ``config.image_size`` get learned position embeddings
  resized bicubically as torch does (``resize_posemb``; HF's ``interpolate_pos_encoding``).
  """

  config: ViTConfig

  def setup(self):
    cfg = self.config.validate()
    if cfg.stem == "conv":
      self.patch_embed = ConvStem(cfg.patch_size, cfg.width, dtype=cfg.dtype)
    else:
      self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width, use_bias=cfg.patch_bias, dtype=cfg.dtype)
    if cfg.class_token:
      self.cls_token = self.param(
          "cls_token", nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), ("embed",)),
          (cfg.width,), jnp.float32)
    if cfg.posemb == "learned":
      self.pos_embedding = self.param(
          "pos_embedding",
          nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02), (None, "embed")),
          (cfg.num_tokens, cfg.width), jnp.float32)
    if cfg.pre_norm:
      self.pre_norm = LayerNorm(eps=cfg.norm_eps, dtype=cfg.dtype)
    self.layers = [EncoderBlock(cfg, name=f"layers_{i}") for i in range(cfg.depth)]
    if cfg.post_norm:
      self.post_norm = LayerNorm(eps=cfg.norm_eps, dtype=cfg.dtype)
    if cfg.map_head:
      self.head = MapHead(cfg)

  def _posemb(self, grid_h: int, grid_w: int) -> tuple[jax.Array | None, jax.Array]:
    """(CLS position embedding [D] or None, patch position embeddings [grid_h * grid_w, D])."""
    cfg = self.config
    if cfg.posemb == "sincos2d":
      return None, jnp.asarray(sincos_2d(grid_h, grid_w, cfg.width))
    pos = self.pos_embedding
    cls_pos = pos[0] if cfg.class_token else None
    patch_pos = pos[1:] if cfg.class_token else pos
    return cls_pos, resize_posemb(patch_pos, (grid_h, grid_w))

  def embed(self, images: jax.Array) -> jax.Array:
    """Float[B, P(+1), D]: patch embeddings (+ CLS) + position embeddings, pre-normed."""
    cfg = self.config
    _check_images(images, cfg)
    b, h, w, _ = images.shape
    gh, gw = h // cfg.patch_size, w // cfg.patch_size
    dtype = jnp.dtype(cfg.dtype)
    # Pixels past the last whole patch are dropped, as torch's strided Conv2d does
    # (SigLIP So400m/14 at 384 px sees 27 x 14 = 378 of them).
    x = self.patch_embed(images[:, : gh * cfg.patch_size, : gw * cfg.patch_size])
    cls_pos, patch_pos = self._posemb(gh, gw)
    x = x + patch_pos.astype(dtype)[None]
    if cfg.class_token:
      cls = self.cls_token if cls_pos is None else self.cls_token + cls_pos
      cls = jnp.broadcast_to(cls.astype(dtype)[None, None, :], (b, 1, cfg.width))
      x = jnp.concatenate([cls, x], axis=1)
    if cfg.pre_norm:
      x = self.pre_norm(x)
    return nn.with_logical_constraint(x, ("batch", "patches", "embed"))

  def features(self, images: jax.Array) -> dict:
    """Every intermediate: {"hidden_states", "tokens", "pooled"}.

    hidden_states: tuple of depth + 1 Float[B, P(+1), D], the embeddings (after pre_norm)
      then each block's output, no post_norm (HF's ``output_hidden_states`` layout).
    tokens: what ``__call__`` returns (post-normed when post_norm and post_norm_tokens).
    pooled: Float[B, D]: the MAP head output if map_head; else the CLS token of the last
      block (post-normed if post_norm, whatever post_norm_tokens says: CLIP's
      pooler_output); else the mean of the last block's (post-normed) tokens.
    """
    cfg = self.config
    x = self.embed(images)
    hidden = [x]
    for layer in self.layers:
      x = layer(x)
      hidden.append(x)
    norm = self.post_norm if cfg.post_norm else (lambda t: t)
    tokens = norm(hidden[cfg.output_layer]) if cfg.post_norm_tokens else hidden[cfg.output_layer]
    last = tokens if cfg.output_layer == -1 and cfg.post_norm_tokens else norm(hidden[-1])
    if cfg.map_head:
      pooled = self.head(last)
    elif cfg.class_token:
      pooled = last[:, 0]
    else:
      pooled = jnp.mean(last.astype(jnp.float32), axis=1).astype(last.dtype)
    return {"hidden_states": tuple(hidden), "tokens": tokens, "pooled": pooled}

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.features(images)["tokens"]

  def pooled(self, images: jax.Array) -> jax.Array:
    """Float[B, D]: the pooled vector of ``features``."""
    return self.features(images)["pooled"]


def stem_flops(v: ViTConfig) -> float:
  """Forward matmul FLOPs of a ViT's stem (`ViTConfig.stem`) on one image (2mnk per multiply-add)."""
  grid = v.image_size // v.patch_size
  if v.stem != "conv":
    return 2 * grid * grid * v.patch_size ** 2 * 3 * v.width
  total, side, c_in = 0, v.image_size, 3
  for c_out in conv_stem_channels(v.patch_size, v.width):
    side //= 2
    total += 2 * side * side * 9 * c_in * c_out
    c_in = c_out
  return total + 2 * grid * grid * c_in * v.width


def count_params(config: ViTConfig) -> int:
  """Number of parameters of a tower, from jax.eval_shape (nothing is allocated)."""
  model = VisionTransformer(config)
  images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes["params"]))))
