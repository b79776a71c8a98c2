"""The real task: Flamingo from the config, on the data built by `mmjax data build`.

`model_config(config, tokenizer)` turns `config.model` (every field of
`mmjax.models.flamingo.FlamingoConfig`, as nested dicts) into the frozen dataclass, taking
the vocabulary size and the `<image>` / `<|endofchunk|>` ids from the tokenizer and the
compute dtype from `config.mixed_precision`. `flamingo_task(config)` gives the loop its
`Task`: init/apply of the model, parameter labels, train and validation pipelines and the
analytic FLOP count.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import data as data_lib
from mmjax.models import flamingo
from mmjax.models.decoder import DecoderConfig
from mmjax.models.perceiver import PerceiverConfig
from mmjax.models.vit import ViTConfig
from mmjax.families import base
from mmjax.families.flamingo import flops as flops_lib


def preset_dict(name: str) -> dict:
  """A zoo preset as nested plain dicts, for `config.model` (every field overridable)."""
  from mmjax import zoo
  return dataclasses.asdict(zoo.get(name))


def _replace(cls, values: ml_collections.ConfigDict | dict, where: str, **forced):
  values = dict(values)
  known = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"config.model.{where} has fields {unknown} that {cls.__name__} does not; expected {sorted(known)}")
  values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}
  values.update(forced)
  return cls(**values)


def data_dir(config: ml_collections.ConfigDict) -> str:
  return os.path.abspath(os.path.expanduser(str(config.data.dir) or data_lib.default_data_dir()))


# A work directory's own copy of the tokenizer it trains with (`workdir.record_files`).
TOKENIZER_COPY = "tokenizer.model"


def tokenizer_file(config: ml_collections.ConfigDict, workdir: str | None = None) -> str:
  """The tokenizer a run uses: its work directory's copy once there is one (the data
  directory's may have been retrained since, and the checkpoints' ids are the copy's),
  else the data directory's."""
  if workdir is not None:
    copy = os.path.join(workdir, TOKENIZER_COPY)
    if os.path.exists(copy):
      return copy
  d = data_dir(config)
  try:
    return data_lib.tokenizer_path(d)
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"no dataset in {d!r} ({e}); build it with `mmjax data build --data-dir {d}`") from None


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str | None = None) -> data_lib.Tokenizer:
  return data_lib.Tokenizer.load(tokenizer_file(config, workdir))


def _read_tokenizer(config: ml_collections.ConfigDict, workdir: str | None) -> bytes:
  path = tokenizer_file(config, workdir)
  with open(path, "rb") as f:
    content = f.read()
  if workdir is not None and path == os.path.join(workdir, TOKENIZER_COPY):
    try:
      with open(tokenizer_file(config), "rb") as f:
        changed = f.read() != content
    except (OSError, ValueError):
      changed = False
    if changed:
      logging.getLogger(__name__).warning(
          "the tokenizer of data directory %s is not the one %s was trained with; using the work directory's "
          "copy %s (train into a new --workdir to use the new one)", data_dir(config), workdir, path)
  return content


def model_config(config: ml_collections.ConfigDict, tokenizer: data_lib.Tokenizer) -> flamingo.FlamingoConfig:
  m = config.model
  dtype = str(config.mixed_precision.compute_dtype)
  remat_layers = str(config.train.remat) == "layers"
  return flamingo.FlamingoConfig(
      vision=_replace(ViTConfig, m.vision, "vision", dtype=dtype),
      resampler=_replace(PerceiverConfig, m.resampler, "resampler", dtype=dtype),
      decoder=_replace(DecoderConfig, m.decoder, "decoder", dtype=dtype, vocab_size=tokenizer.vocab_size,
                       remat=remat_layers or bool(m.decoder.get("remat", False))),
      media_token_id=tokenizer.image_id, end_of_chunk_token_id=tokenizer.end_of_chunk_id)


def bucket(config: ml_collections.ConfigDict) -> data_lib.Bucket:
  return data_lib.Bucket(max_images=int(config.data.num_images), text_length=int(config.data.text_length),
                         image_size=int(config.data.image_size))


def parse_mixture(spec: str) -> dict[str, float] | str | None:
  """"interleaved:1,qa:1" -> {"interleaved": 1.0, "qa": 1.0}; "" -> the default; "sqrt" as is."""
  spec = spec.strip()
  if not spec:
    return None
  if spec == "sqrt":
    return spec
  out = {}
  for part in spec.split(","):
    if ":" not in part:
      raise ValueError(f"data.mixture part {part!r} must look like 'name:weight'")
    name, w = part.split(":", 1)
    out[name.strip()] = float(w)
  return out


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
  tokenizer_bytes = _read_tokenizer(config, workdir)
  tokenizer = data_lib.Tokenizer(tokenizer_bytes)
  cfg = model_config(config, tokenizer)
  model = Model(cfg, example_batch(config, tokenizer), float(config.init.gate_value))
  d, bk = data_dir(config), bucket(config)
  # data.batch_size is the global batch; each process reads its rows (or all of them).
  bsz = base.process_batch_size(config)
  by_process = bool(config.data.get("shard_by_process", True))
  mixture = parse_mixture(str(config.data.mixture))
  max_bad = int(config.data.get("max_consecutive_bad_records",
                                data_lib.pipeline.DEFAULT_MAX_CONSECUTIVE_BAD_RECORDS))

  def train_data():
    return data_lib.make_pipeline(d, "train", batch_size=bsz, bucket=bk, seed=int(config.seed), mixture=mixture,
                                  num_workers=int(config.data.num_workers), tokenizer=tokenizer,
                                  shard_by_jax_process=by_process, max_consecutive_bad_records=max_bad)

  def val_data():
    return data_lib.make_pipeline(d, "validation", batch_size=bsz, bucket=bk, seed=0, mixture=mixture,
                                  num_epochs=1, shuffle=False, tokenizer=tokenizer, shard_by_jax_process=by_process,
                                  max_consecutive_bad_records=max_bad)

  fwd = flops_lib.flamingo_forward_flops(cfg, bk.max_images, bk.text_length)
  return base.Task(init_params=model.init, apply_fn=model.apply, param_labels=flamingo.param_labels,
                   train_data=train_data, val_data=val_data,
                   flops_per_example=lambda trainable: flops_lib.train_flops_per_example(fwd, trainable),
                   boxed_params=model.boxed, workdir_files=lambda: {TOKENIZER_COPY: tokenizer_bytes},
                   components=flamingo.COMPONENTS)
