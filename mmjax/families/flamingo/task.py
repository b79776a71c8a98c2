"""The real task: Flamingo from the config, on the data built by `mmjax data build`.

`model_config(config, tokenizer)` turns `config.model` (every field of
`mmjax.families.flamingo.model.FlamingoConfig`, as nested dicts) into the frozen dataclass, taking
the vocabulary size and the `<image>` / `<|endofchunk|>` ids from the tokenizer and the
compute dtype from `config.mixed_precision`. `flamingo_task(config)` gives the loop its
`Task`: init/apply of the model, parameter labels, train and validation pipelines and the
analytic FLOP count.
"""

from __future__ import annotations


import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import data as data_lib
from mmjax.families import base, common
from mmjax.families.flamingo import flops as flops_lib
from mmjax.families.flamingo import gates
from mmjax.families.flamingo import generation
from mmjax.families.flamingo import model as flamingo
from mmjax.models.decoder import DecoderConfig
from mmjax.models.perceiver import PerceiverConfig
from mmjax.models.vit import ViTConfig


# Keys of `config.model` that are not FlamingoConfig fields.
NOT_MODEL_FIELDS = ("family",)


def model_config(config: ml_collections.ConfigDict, tokenizer: data_lib.Tokenizer) -> flamingo.FlamingoConfig:
  m = flamingo.upgrade_model_dict(config.model.to_dict())
  dtype = str(config.mixed_precision.compute_dtype)
  remat_layers = str(config.train.remat) == "layers"
  top = {k: v for k, v in m.items() if k not in ("vision", "resampler", "decoder") + NOT_MODEL_FIELDS}
  return common.replace_fields(
      flamingo.FlamingoConfig, top, "",
      vision=common.replace_fields(ViTConfig, m["vision"], "vision", dtype=dtype),
      resampler=common.replace_fields(PerceiverConfig, m["resampler"], "resampler", dtype=dtype),
      decoder=common.replace_fields(DecoderConfig, m["decoder"], "decoder", dtype=dtype, vocab_size=tokenizer.vocab_size,
                                    remat=remat_layers or bool(m["decoder"].get("remat", False))),
      media_token_id=tokenizer.image_id, end_of_chunk_token_id=tokenizer.end_of_chunk_id)


def bucket(config: ml_collections.ConfigDict) -> data_lib.Bucket:
  if int(config.data.num_images) < 1:
    raise ValueError(f"data.num_images={int(config.data.num_images)}; expected >= 1 (Flamingo reads images; "
                     "0 means text only, which the `lm` family trains on)")
  return data_lib.Bucket(max_images=int(config.data.num_images), text_length=int(config.data.text_length),
                         image_size=int(config.data.image_size))


class Model:
  """Flamingo with unboxed float32 parameters: init(key) -> params, apply(params, batch) -> logits."""

  def __init__(self, cfg: flamingo.FlamingoConfig, example: dict, gate_init: float = 0.0):
    self.config = cfg
    self.module = flamingo.Flamingo(cfg)
    self._example = example
    self.gate_init = float(gate_init)

  def init(self, key):
    ex = self._example
    variables = self.module.init(key, jnp.asarray(ex["images"]), jnp.asarray(ex["input_ids"]),
                                 jnp.asarray(ex["image_index"]), jnp.asarray(ex["image_mask"]))
    params = flax.core.meta.unbox(variables["params"])
    if self.gate_init == 0.0:
      return params  # Flamingo's zero init: the model starts as the LM it was given
    # From scratch there is no LM to preserve: open gates let gradients reach the
    # cross-attention from the first step instead of waiting for the gates to grow.
    def set_gate(path, p):
      name = getattr(path[-1], "key", None)
      return jnp.full_like(p, self.gate_init) if name in ("attn_gate", "ff_gate") else p
    return jax.tree_util.tree_map_with_path(set_gate, params)

  def boxed(self, key):
    """The abstract parameters with their logical-axis boxes (for the sharding rules)."""
    ex = self._example
    return jax.eval_shape(self.module.init, key, jnp.asarray(ex["images"]), jnp.asarray(ex["input_ids"]),
                          jnp.asarray(ex["image_index"]), jnp.asarray(ex["image_mask"]))["params"]

  def apply(self, params, batch, rng=None):
    del rng  # no dropout in these models
    return self.module.apply({"params": params}, batch["images"], batch["input_ids"], batch["image_index"],
                             batch["image_mask"])


def adopt_params(params: dict, family: str, other: dict) -> dict:
  """Flamingo params with another run's pretrained part in place: an `lm` run's LM as the
  decoder, or a `contrastive` run's image tower as the vision tower (what the other does
  not give keeps its fresh init: the cross-attention layers and the resampler always).
  ValueError naming what does not fit."""
  if family == "contrastive":
    return _adopt_vision(params, other)
  if family != "lm":
    raise ValueError(f"a Flamingo run can start from an 'lm' run's or a 'contrastive' run's checkpoint; got one "
                     f"of family {family!r}")
  mine, theirs = params["decoder"], other["decoder"]
  missing = sorted(set(mine) - set(theirs) - {k for k in mine if k.startswith("xattn")})
  extra = sorted(set(theirs) - set(mine))
  if "blocks" in mine or "blocks" in theirs:
    if ("blocks" in mine) != ("blocks" in theirs):
      raise ValueError("the lm run and this Flamingo differ in model.decoder.scan_layers; expected the same layout")
    raise ValueError("starting a scanned Flamingo from an lm run is not supported (the scanned blocks interleave "
                     "the cross-attention); train both with model.decoder.scan_layers=False")
  if missing or extra:
    raise ValueError(f"the lm run's decoder does not fit this Flamingo's: missing {missing}, unexpected {extra}; "
                     "expected the same depth and embedding tying")
  shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)
  bad = [k for k in theirs if shapes(theirs[k]) != shapes(mine[k])]
  if bad:
    first = bad[0]
    raise ValueError(f"the lm run's decoder has other shapes at {bad} (e.g. {first}: {shapes(theirs[first])} vs "
                     f"{shapes(mine[first])}); expected model.decoder equal to the lm run's")
  return {**params, "decoder": {**mine, **{k: jax.tree.map(jnp.asarray, v) for k, v in theirs.items()}}}


def _adopt_vision(params: dict, other: dict) -> dict:
  """Flamingo params with a `contrastive` run's image tower as `vision` (its text tower and
  projection are not used: Flamingo reads the tower's tokens, not its pooled embedding)."""
  flat = lambda t: {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  mine, theirs = flat(params["vision"]), flat(other["vision"])
  missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
  if missing or extra:
    raise ValueError(f"the contrastive run's vision tower does not fit this Flamingo's: missing {missing}, "
                     f"unexpected {extra}; expected model.vision equal to the contrastive run's")
  bad = [k for k in theirs if theirs[k] != mine[k]]
  if bad:
    first = bad[0]
    raise ValueError(f"the contrastive run's vision tower has other shapes at {bad} (e.g. {first}: {theirs[first]} "
                     f"vs {mine[first]}); expected model.vision equal to the contrastive run's")
  return {**params, "vision": jax.tree.map(jnp.asarray, other["vision"])}


def example_batch(config: ml_collections.ConfigDict, tokenizer: data_lib.Tokenizer, batch_size: int = 1) -> dict:
  """A valid all-padding batch of the config's bucket (for init and shapes)."""
  b = bucket(config)
  ids = np.full((batch_size, b.text_length), tokenizer.pad_id, np.int32)
  ids[:, 0] = tokenizer.image_id
  return {"images": np.zeros((batch_size, b.max_images, b.image_size, b.image_size, 3), np.uint8),
          "image_mask": np.arange(b.max_images)[None, :].repeat(batch_size, 0) < 1,
          "input_ids": ids, "image_index": np.ones_like(ids), "targets": ids.copy(),
          "loss_mask": np.zeros(ids.shape, np.float32)}


def flamingo_task(config: ml_collections.ConfigDict, workdir: str | None = None) -> base.Task:
  """The loop's Task for `config`; with `workdir`, on the tokenizer that work directory
  trains with (`tokenizer_file`)."""
  tokenizer_bytes = common.read_tokenizer(config, workdir)
  tokenizer = data_lib.Tokenizer(tokenizer_bytes)
  cfg = model_config(config, tokenizer)
  model = Model(cfg, example_batch(config, tokenizer), float(config.init.gate_value))
  d, bk = common.data_dir(config), bucket(config)
  train_data, val_data = common.pipelines(config, tokenizer, bk)

  fwd = flops_lib.flamingo_forward_flops(cfg, bk.max_images, bk.text_length)
  return base.Task(init_params=model.init, apply_fn=model.apply, param_labels=flamingo.param_labels,
                   train_data=train_data, val_data=val_data,
                   flops_per_example=lambda trainable: flops_lib.train_flops_per_example(fwd, trainable),
                   boxed_params=model.boxed, workdir_files=lambda: {common.TOKENIZER_COPY: tokenizer_bytes},
                   tokenizer=tokenizer, data_dir=d, decoding=generation.decoding(cfg), takes_images=True,
                   adopt_params=adopt_params, param_metrics=gates.gate_values,
                   components=flamingo.COMPONENTS)
