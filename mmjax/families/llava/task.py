"""The `llava` task: LLaVA from an experiment config, trained on conversations rendered from a
data directory's records (`mmjax.data.conversation`), with the loss on the assistant's turns.

`config.model` holds every `LlavaConfig` field (`vision` and `decoder` as dicts of
`ViTConfig` and `DecoderConfig` fields); the vocabulary size and the `<image>` id come from
the tokenizer, the compute dtype from `config.mixed_precision`. `config.data` adds to the
usual fields: `chat_template` (a name of `mmjax.data.conversation.TEMPLATES`),
`system_prompt` (None: the template's own), `max_slots` (N image slots per sequence:
LLaVA-1.5 one per image, LLaVA-NeXT the base view and tiles of each), `pack` (several
conversations per sequence, with segment ids) and `buckets` (ascending lengths, the largest
`text_length`: each batch cut to the smallest that holds it, one compile per bucket; not
with `pack`).

A batch: images uint8 [B, N, S, S, 3], image_mask [B, N], input_ids, feature_index,
targets, loss_mask, segment_ids, positions [B, T] (`mmjax.data.conversation`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import data as data_lib
from mmjax.families import base, common
from mmjax.families.llava import model as llava
from mmjax.infer import Decoding
from mmjax.models.decoder import DecoderConfig
from mmjax.models.vit import ViTConfig, stem_flops

NOT_MODEL_FIELDS = ("family",)


def model_config(config: ml_collections.ConfigDict, vocab_size: int | None = None,
                 image_token_id: int | None = None) -> llava.LlavaConfig:
  """The `LlavaConfig` of `config.model` (vocab_size and image_token_id from the tokenizer
  when given, else the config's)."""
  m = config.model.to_dict()
  dtype = str(config.mixed_precision.compute_dtype)
  remat = str(config.train.remat) == "layers" or bool(m.get("decoder", {}).get("remat", False))
  top = {k: v for k, v in m.items() if k not in ("vision", "decoder") + NOT_MODEL_FIELDS}
  if "grid_pinpoints" in top:
    top["grid_pinpoints"] = tuple(tuple(int(x) for x in p) for p in top["grid_pinpoints"])
  if image_token_id is not None:
    top["image_token_id"] = image_token_id
  decoder_forced = dict(dtype=dtype, remat=remat)
  if vocab_size is not None:
    decoder_forced["vocab_size"] = vocab_size
  return common.replace_fields(
      llava.LlavaConfig, top, "",
      vision=common.replace_fields(ViTConfig, m["vision"], "vision", dtype=dtype),
      decoder=common.replace_fields(DecoderConfig, m["decoder"], "decoder", **decoder_forced)).validate()


def upgrade_model(model: dict) -> dict:
  """A recorded `config.model`: fields added since then take their defaults."""
  out = common.with_new_fields(llava.LlavaConfig, {k: v for k, v in model.items() if k not in ("vision", "decoder")})
  out["vision"] = common.with_new_fields(ViTConfig, dict(model.get("vision", {})))
  out["decoder"] = common.with_new_fields(DecoderConfig, dict(model.get("decoder", {})))
  return out


def slots(config: ml_collections.ConfigDict) -> int:
  n = int(config.data.get("max_slots", 1))
  if n < 1:
    raise ValueError(f"data.max_slots={n}; expected >= 1 (image slots per sequence)")
  return n


def check_config(config: ml_collections.ConfigDict, cfg: llava.LlavaConfig) -> None:
  """ValueError naming the first data setting this model cannot take."""
  size = int(config.data.image_size)
  if size != cfg.vision.image_size:
    raise ValueError(f"data.image_size={size} but model.vision.image_size={cfg.vision.image_size}; expected equal "
                     "(each image slot is one tower input)")
  length = int(config.data.text_length)
  if length > cfg.decoder.max_length:
    raise ValueError(f"data.text_length={length} exceeds model.decoder.max_length={cfg.decoder.max_length}")


def abstract_batch(cfg: llava.LlavaConfig, batch: int, length: int, num_slots: int) -> dict:
  sds, s = jax.ShapeDtypeStruct, cfg.vision.image_size
  ints = lambda: sds((batch, length), jnp.int32)
  return {"images": sds((batch, num_slots, s, s, 3), jnp.uint8), "image_mask": sds((batch, num_slots), jnp.bool_),
          "input_ids": ints(), "feature_index": ints(), "targets": ints(),
          "loss_mask": sds((batch, length), jnp.float32), "segment_ids": ints(), "positions": ints()}


class Model:
  """LLaVA with unboxed float32 parameters: init(key) -> params, apply(params, batch) -> logits."""

  def __init__(self, cfg: llava.LlavaConfig, length: int, num_slots: int):
    self.config = cfg
    self.module = llava.Llava(cfg)
    s = cfg.vision.image_size
    ids = np.zeros((1, length), np.int32)
    self._example = (jnp.zeros((1, num_slots, s, s, 3), jnp.uint8), jnp.asarray(ids),
                     jnp.full((1, length), llava.TEXT, jnp.int32))

  def init(self, key):
    return flax.core.meta.unbox(self.module.init(key, *self._example)["params"])

  def boxed(self, key):
    return jax.eval_shape(self.module.init, key, *self._example)["params"]

  def apply(self, params, batch, rng=None):
    del rng  # no dropout
    logits, _ = self.module.apply({"params": params}, batch["images"], batch["input_ids"], batch["feature_index"],
                                  positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
    return logits


def forward_flops(cfg: llava.LlavaConfig, num_slots: int, length: int) -> dict[str, float]:
  """Per-example forward matmul FLOPs of each component (2mnk per matmul, the LM's causal
  attention counted half), every slot through the tower."""
  v, d = cfg.vision, cfg.decoder
  p, dv = v.grid_size ** 2 + int(v.class_token), v.width
  vit_layer = 2 * p * dv * 3 * dv + 2 * p * dv * dv + 4 * p * p * dv + 2 * 2 * p * dv * v.mlp_dim
  vision = num_slots * (stem_flops(v) + v.depth * vit_layer)
  feat = dv * len(cfg.vision_feature_layers)
  tokens = num_slots * cfg.tokens_per_slot
  projector = 2 * tokens * feat * d.width + (2 * tokens * d.width * d.width if cfg.projector == "mlp2x" else 0)
  w, hk, gk, t = d.width, d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim, length
  layer = 2 * t * w * hk + 2 * t * w * 2 * gk + 2 * t * hk * w + 4 * t * t * hk / 2 + 3 * 2 * t * w * d.mlp_dim
  lm = d.depth * layer + 2 * t * w * d.vocab_size
  return {"vision": float(vision), "projector": float(projector), "lm": float(lm)}


def train_flops(fwd: dict[str, float], trainable: frozenset) -> float:
  """x3 for a trained component, x2 for a frozen one a gradient passes through (one with a
  trained component upstream), x1 otherwise: the tower, then the projector, then the LM."""
  total, upstream = 0.0, False
  for comp in ("vision", "projector", "lm"):
    train = comp in trainable
    total += (3 if train else 2 if upstream else 1) * fwd[comp]
    upstream |= train
  return total


@functools.lru_cache(maxsize=32)
def decoding(cfg: llava.LlavaConfig) -> Decoding:
  """Cached generation: the prefill encodes the images and splices them in once; the steps
  read the KV cache only. Inputs: {"images": [B, N, S, S, 3], "feature_index": Int[B, T]
  (optional: without it the k-th `<image>` position takes image-table row k, LLaVA-1.5's
  order)}; `<image>` is never sampled."""
  module = llava.Llava(cfg)

  def prefill(params, inputs, ids, positions, lengths, cache):
    del lengths
    index = inputs.get("feature_index")
    if index is None:
      index = llava.plain_feature_index(ids, cfg.image_token_id)
    else:  # the generator pads the prompt to its bucket: the padding is text
      index = jnp.pad(index.astype(jnp.int32), ((0, 0), (0, ids.shape[1] - index.shape[1])),
                      constant_values=llava.TEXT)
    logits, cache = module.apply(params, inputs["images"], ids, index, positions=positions, cache=cache)
    return logits, cache, ()

  def step(params, token, position, context, cache):
    del context
    return module.apply(params, token, positions=position, cache=cache, method=llava.Llava.decode)

  def validate(inputs, prompt_ids):
    validate_inputs(cfg, inputs, prompt_ids)

  return Decoding(max_length=cfg.decoder.max_length,
                  init_cache=lambda batch, length: llava.init_cache(cfg, batch, length),
                  prefill=prefill, step=step, banned_ids=(cfg.image_token_id,), validate=validate)


def validate_inputs(cfg: llava.LlavaConfig, inputs, prompt_ids: np.ndarray) -> None:
  """ValueError naming what does not fit: images not [B, N, S, S, 3], a feature_index of
  another shape, or more `<image>` positions than the slots give tokens."""
  if "images" not in inputs:
    raise ValueError(f"LLaVA generation needs inputs['images'] [B, N, S, S, 3]; got keys {sorted(inputs)}")
  images = np.asarray(inputs["images"])
  b, t = prompt_ids.shape
  s = cfg.vision.image_size
  if images.ndim != 5 or images.shape[0] != b or images.shape[2:] != (s, s, 3):
    raise ValueError(f"images have shape {images.shape}; expected [{b}, slots, {s}, {s}, 3]")
  table = images.shape[1] * cfg.tokens_per_slot
  index = inputs.get("feature_index")
  if index is not None:
    index = np.asarray(index)
    if index.shape != (b, t):
      raise ValueError(f"feature_index has shape {index.shape}; expected the prompt's {(b, t)}")
    placed = (index >= 0) | (index == llava.NEWLINE)
    if (placed != (prompt_ids == cfg.image_token_id)).any():
      row = int(np.argwhere(placed != (prompt_ids == cfg.image_token_id))[0][0])
      raise ValueError(f"prompt {row}: feature_index places image tokens at other positions than its <image> "
                       "ids; expected exactly the <image> positions")
    top = int(index.max(initial=-1))
  else:
    top = int((prompt_ids == cfg.image_token_id).sum(axis=1).max(initial=0)) - 1
  if top >= table:
    raise ValueError(f"the prompts ask for image token {top + 1} but {images.shape[1]} slots give {table} "
                     f"({cfg.tokens_per_slot} each); expected as many <image> positions as the images' tokens")


def adopt_params(params: dict, family: str, other: dict) -> dict:
  """LLaVA params with another run's in place: an `lm` run's decoder, a `contrastive` run's
  image tower, or all of another `llava` run's (stage 2 from stage 1). ValueError naming
  what does not fit."""
  if family == "lm":
    return {**params, "decoder": _same("the lm run's decoder", params["decoder"], other["decoder"])}
  if family == "contrastive":
    return {**params, "vision": _same("the contrastive run's vision tower", params["vision"], other["vision"])}
  if family == "llava":
    return _same("the llava run's parameters", params, other)
  raise ValueError(f"a LLaVA run can start from an 'lm', a 'contrastive' or a 'llava' run's checkpoint; got one of "
                   f"family {family!r}")


def _same(what: str, mine, theirs):
  """`theirs` (as jax arrays) when it has `mine`'s tree and shapes; ValueError naming the difference."""
  flat = lambda t: {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  a, b = flat(mine), flat(theirs)
  missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
  if missing or extra:
    raise ValueError(f"{what} does not fit this LLaVA's: missing {missing[:5]}, unexpected {extra[:5]}; expected "
                     "the same model settings")
  bad = [k for k in a if a[k] != b[k]]
  if bad:
    raise ValueError(f"{what} has other shapes at {bad[:5]} (e.g. {bad[0]}: {b[bad[0]]} vs {a[bad[0]]}); expected "
                     "the same model settings")
  return jax.tree.map(jnp.asarray, theirs)


def llava_task(config: ml_collections.ConfigDict, workdir: str | None = None) -> base.Task:
  """The loop's Task for `config`; with `workdir`, on the tokenizer that work directory trains with."""
  from mmjax.families.llava import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  tokenizer_bytes = common.read_tokenizer(config, workdir)
  tokenizer = data_lib.Tokenizer(tokenizer_bytes)
  cfg = model_config(config, tokenizer.vocab_size, tokenizer.image_id)
  check_config(config, cfg)
  n, t = slots(config), int(config.data.text_length)
  model = Model(cfg, t, n)
  d = common.data_dir(config)
  builder = conversation_builder(config, cfg, tokenizer)
  train_data, val_data = pipelines(config, builder)
  fwd = forward_flops(cfg, n, t)
  return base.Task(init_params=model.init, apply_fn=model.apply, param_labels=llava.param_labels,
                   train_data=train_data, val_data=val_data,
                   flops_per_example=lambda trainable: train_flops(fwd, trainable),
                   boxed_params=model.boxed, workdir_files=lambda: {common.TOKENIZER_COPY: tokenizer_bytes},
                   components=llava.COMPONENTS, tokenizer=tokenizer, data_dir=d, decoding=decoding(cfg),
                   adopt_params=adopt_params,
                   evaluate=lambda params: evaluate_lib.evaluate(config, cfg, tokenizer, builder, params),
                   render_prompt=lambda prompt, images: evaluate_lib.render_prompt(builder, prompt, images))


# The embedded dataset's questions and captions as conversations.
DEFAULT_MIXTURE = "qa:1,captions:1"


@dataclasses.dataclass(frozen=True)
class AnyResSlots:
  """LLaVA-NeXT's image geometry for the conversation builder: an image -> its base view and
  AnyRes tiles, and the index map of its tokens (`anyres`)."""
  pinpoints: tuple[tuple[int, int], ...]
  tile_size: int
  patch_size: int

  def __call__(self, image: np.ndarray, first_slot: int) -> tuple[np.ndarray, np.ndarray]:
    from mmjax.families.llava import anyres  # pylint: disable=g-import-not-at-top
    index = anyres.feature_index(image.shape[:2], self.pinpoints, self.tile_size, self.patch_size, first_slot)
    return anyres.tiles(image, self.pinpoints, self.tile_size), index


def template(config: ml_collections.ConfigDict):
  """The chat template `data.chat_template` names, with `data.system_prompt` when set."""
  from mmjax.data import conversation  # pylint: disable=g-import-not-at-top
  chosen = conversation.template_by_name(str(config.data.get("chat_template", "vicuna_v1")))
  system = config.data.get("system_prompt", None)
  if system is None:
    return chosen
  if not hasattr(chosen, "system"):
    raise ValueError(f"data.system_prompt={system!r} but template {chosen.name!r} has no system prompt; expected "
                     "None")
  chosen = copy.copy(chosen)
  chosen.system = str(system)
  return chosen


def conversation_builder(config: ml_collections.ConfigDict, cfg: llava.LlavaConfig, tokenizer: data_lib.Tokenizer):
  """The record -> example builder of `config` (template, slots, the image geometry of `cfg`)."""
  from mmjax.data import conversation  # pylint: disable=g-import-not-at-top
  s, p = cfg.vision.image_size, cfg.tokens_per_slot
  if cfg.grid_pinpoints:
    image_slots = AnyResSlots(cfg.grid_pinpoints, s, cfg.vision.patch_size)
  else:
    mean = tuple(int(255 * m) for m in cfg.vision.image_mean)
    image_slots = conversation.SquareSlots(s, p, background=mean)
  return conversation.ConversationBuilder(tokenizer, template(config), int(config.data.text_length), slots(config),
                                          s, p, image_slots)


def pipelines(config: ml_collections.ConfigDict, builder):
  """(train_data, val_data) of conversations as `config.data` says (mixture, packing, workers)."""
  from mmjax.data import conversation  # pylint: disable=g-import-not-at-top
  d = common.data_dir(config)
  bsz = base.process_batch_size(config)
  kwargs = dict(data_dir=d, batch_size=bsz, shard_by_jax_process=bool(config.data.get("shard_by_process", True)),
                mixture=common.parse_mixture(str(config.data.get("mixture", "")) or DEFAULT_MIXTURE),
                max_consecutive_bad_records=int(config.data.get("max_consecutive_bad_records", 1000)),
                pack=bool(config.data.get("pack", False)),
                buckets=tuple(int(b) for b in config.data.get("buckets", ()) or ()))

  def train_data():
    return conversation.make_conversation_pipeline(builder, split="train", seed=int(config.seed),
                                                   num_workers=int(config.data.num_workers), **kwargs)

  def val_data():
    return conversation.make_conversation_pipeline(builder, split="validation", seed=0, num_epochs=1,
                                                   shuffle=False, **kwargs)

  return train_data, val_data
