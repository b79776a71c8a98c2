"""The `blip2` task: BLIP-2's two stages, InstructBLIP and MiniGPT-4 from an experiment config.

`config.model` holds every `Blip2Config` field, `vision`, `qformer` and `decoder` as dicts
of their dataclasses' fields (`decoder` None: the stage-1 model). What the stage is follows
from the model: without a decoder the run is stage 1, with one stage 2.

- Stage 1 (representation learning) trains on image-text pairs (`data.mixture`, the
  embedded captions by default): each text is BOS (the [CLS] ITC pools, which ITG replaces
  by [DEC]), its tokens and EOS, padded. The loss is `losses.stage1_loss`, weighted by
  `config.loss.{itc,itm,itg}`. The Q-Former's vocabulary is the data tokenizer's plus one
  row, [DEC] (as BLIP-2 adds [DEC] to BERT's).
- Stage 2 (generative learning) trains on conversations (the embedded questions and
  captions) rendered in BLIP-2's prompt format (`Blip2Template`): the Q placeholders, BOS,
  "Question: {q} Answer:", " {a}" and EOS, the loss on the answer and its EOS. InstructBLIP
  (`model.instruction`) also gives the Q-Former the instruction: the user's words of the
  first round, BOS + words + EOS, `data.instruction_length` tokens.

The vocabulary sizes, the `<image>` id and the Q-Former's pad/[DEC] ids come from the
tokenizer; the LM's compute dtype from `config.mixed_precision` (the Q-Former runs in
float32, as Hugging Face keeps it).
"""

from __future__ import annotations

import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import data as data_lib
from mmjax.data import conversation, pairs
from mmjax.data.preprocess import BadImageError, decode_image
from mmjax.data.scenes import IMAGE_TOKEN
from mmjax.families import base, common
from mmjax.families.blip2 import losses
from mmjax.families.blip2 import model as blip2
from mmjax.families.blip2.qformer import QFormerConfig
from mmjax.infer import Decoding
from mmjax.models.decoder import DecoderConfig
from mmjax.models.vit import ViTConfig, stem_flops

NOT_MODEL_FIELDS = ("family",)
DEFAULT_WEIGHTS = {"itc": 1.0, "itm": 1.0, "itg": 1.0}
# Stage 2's data when `data.mixture` names none.
DEFAULT_MIXTURE = "qa:1,captions:1"


# ---------------------------------------------------------------- the model config

def model_config(config: ml_collections.ConfigDict, tokenizer: data_lib.Tokenizer | None = None) -> blip2.Blip2Config:
  """The `Blip2Config` of `config.model`; the vocabularies and special ids from `tokenizer` when given."""
  m = config.model.to_dict()
  dtype = str(config.mixed_precision.compute_dtype)
  top = {k: v for k, v in m.items() if k not in ("vision", "qformer", "decoder") + NOT_MODEL_FIELDS}
  if "temperature_range" in top:
    top["temperature_range"] = tuple(float(x) for x in top["temperature_range"])
  qformer = dict(m.get("qformer", {}))
  if tokenizer is not None:
    qformer["vocab_size"] = tokenizer.vocab_size + 1
    top.update(decoder_token_id=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id, image_token_id=tokenizer.image_id)
  vision = common.replace_fields(ViTConfig, m["vision"], "vision", dtype=dtype)
  qformer["encoder_width"] = vision.width  # the tower decides it
  decoder = None
  if m.get("decoder") is not None:
    remat = str(config.train.remat) == "layers" or bool(m["decoder"].get("remat", False))
    forced = dict(dtype=dtype, remat=remat)
    if tokenizer is not None:
      forced["vocab_size"] = tokenizer.vocab_size
    decoder = common.replace_fields(DecoderConfig, m["decoder"], "decoder", **forced)
  return common.replace_fields(blip2.Blip2Config, top, "", vision=vision,
                               qformer=common.replace_fields(QFormerConfig, qformer, "qformer"),
                               decoder=decoder).validate()


def upgrade_model(model: dict) -> dict:
  """A recorded `config.model`: fields added since then take their defaults."""
  out = common.with_new_fields(blip2.Blip2Config, {k: v for k, v in model.items()
                                                   if k not in ("vision", "qformer", "decoder")})
  out["vision"] = common.with_new_fields(ViTConfig, dict(model.get("vision", {})))
  out["qformer"] = common.with_new_fields(QFormerConfig, dict(model.get("qformer", {})))
  out["decoder"] = None if model.get("decoder") is None else common.with_new_fields(DecoderConfig, dict(model["decoder"]))
  return out


def loss_weights(config: ml_collections.ConfigDict, cfg: blip2.Blip2Config) -> dict[str, float]:
  """`config.loss.{itc,itm,itg}` (LAVIS's 1, 1, 1 by default); ValueError for a weight on a
  head the model lacks, a negative weight, or none at all."""
  given = config.get("loss", None)
  given = given.to_dict() if given is not None else {}
  unknown = sorted(set(given) - set(DEFAULT_WEIGHTS))
  if unknown:
    raise ValueError(f"config.loss has {unknown}; expected weights named {sorted(DEFAULT_WEIGHTS)}")
  weights = {k: float(given.get(k, DEFAULT_WEIGHTS[k])) for k in blip2.HEADS if k in cfg.heads}
  missing = sorted(k for k, v in given.items() if float(v) and k not in cfg.heads)
  if missing:
    raise ValueError(f"config.loss weights {missing} but the model has no such head (model.heads={list(cfg.heads)})")
  bad = {k: v for k, v in weights.items() if v < 0}
  if bad or not any(weights.values()):
    raise ValueError(f"config.loss weights {weights}; expected non-negative weights, at least one positive")
  return weights


def check_config(config: ml_collections.ConfigDict, cfg: blip2.Blip2Config) -> None:
  """ValueError naming the first data setting this model cannot take."""
  size = int(config.data.image_size)
  if size != cfg.vision.image_size:
    raise ValueError(f"data.image_size={size} but model.vision.image_size={cfg.vision.image_size}; expected equal")
  length = int(config.data.text_length)
  if cfg.decoder is None:
    if not cfg.heads:
      raise ValueError("a BLIP-2 without a decoder is the stage-1 model, but model.heads=(): expected some of "
                       f"{blip2.HEADS}")
    if length > cfg.qformer.max_length:
      raise ValueError(f"data.text_length={length} is longer than the Q-Former's {cfg.qformer.max_length} position "
                       "embeddings (model.qformer.max_length); expected at most that")
    accum = int(config.optimizer.get("grad_accum_steps", 1))
    if accum != 1:
      raise ValueError(f"optimizer.grad_accum_steps={accum}; BLIP-2's ITC compares every pair of the global batch "
                       "and ITM draws its negatives from it, which micro-batches would cut: expected 1")
  else:
    if length > cfg.decoder.max_length:
      raise ValueError(f"data.text_length={length} exceeds model.decoder.max_length={cfg.decoder.max_length}")
    if length <= cfg.num_queries:
      raise ValueError(f"data.text_length={length} leaves no room for text after the {cfg.num_queries} query "
                       "placeholders; expected more")
    if cfg.instruction:
      n = instruction_length(config)
      if n > cfg.qformer.max_length:
        raise ValueError(f"data.instruction_length={n} is longer than the Q-Former's {cfg.qformer.max_length} "
                         "position embeddings (model.qformer.max_length)")


def instruction_length(config: ml_collections.ConfigDict) -> int:
  n = int(config.data.get("instruction_length", 32))
  if n < 2:
    raise ValueError(f"data.instruction_length={n}; expected >= 2 (BOS, words, EOS)")
  return n


# ---------------------------------------------------------------- the model with its params

class Model:
  """BLIP-2 with unboxed float32 parameters: init(key) -> params; apply(params, batch) ->
  stage 2's logits [B, T, V] (stage 1: the `pretrain` outputs); loss for stage 1."""

  def __init__(self, cfg: blip2.Blip2Config, length: int, instruction: int = 0):
    self.config = cfg
    self.module = blip2.Blip2(cfg)
    s = cfg.vision.image_size
    images = jnp.zeros((1, s, s, 3), jnp.uint8)
    ids = jnp.zeros((1, length), jnp.int32)
    if cfg.decoder is None:
      self._example, self._method = (images, ids, jnp.ones((1, length), jnp.int32)), "initialize"
    elif cfg.instruction:
      self._example = (images, ids, jnp.zeros((1, instruction), jnp.int32), jnp.ones((1, instruction), jnp.int32))
      self._method = "__call__"
    else:
      self._example, self._method = (images, ids), "__call__"

  def init(self, key):
    return flax.core.meta.unbox(self.module.init(key, *self._example, method=self._method)["params"])

  def boxed(self, key):
    return jax.eval_shape(functools.partial(self.module.init, method=self._method), key, *self._example)["params"]

  def apply(self, params, batch, rng=None):
    del rng  # no dropout
    if self.config.decoder is None:
      return self.module.apply({"params": params}, batch["images"], batch["input_ids"], batch["text_mask"],
                               method="pretrain")
    logits, _ = self.module.apply({"params": params}, stage2_images(batch["images"]), batch["input_ids"],
                                  batch.get("instruction_ids"), batch.get("instruction_mask"),
                                  positions=batch.get("positions"), segment_ids=batch.get("segment_ids"))
    return logits


def stage2_images(images: jax.Array) -> jax.Array:
  """[B, S, S, 3] from the conversation pipeline's one slot [B, 1, S, S, 3] (or as given)."""
  if images.ndim == 5:
    if images.shape[1] != 1:
      raise ValueError(f"images have {images.shape[1]} slots per example; BLIP-2 reads one image per example "
                       "(data.max_slots=1)")
    return images[:, 0]
  return images


def param_metrics(params) -> dict[str, jax.Array]:
  """Stage 1's ITC temperature, logged every step."""
  return {"temperature": params["temperature"]} if "temperature" in params else {}


# ---------------------------------------------------------------- FLOPs

def forward_flops(cfg: blip2.Blip2Config, length: int, instruction: int = 0) -> dict[str, float]:
  """Per-example forward matmul FLOPs of each component (2mnk per matmul; attention 4·L²·W,
  the LM's causal half). Stage 1 counts its four Q-Former passes (text alone, queries + ITG
  text, and 3 ITM pairs) as LAVIS runs them."""
  v, q = cfg.vision, cfg.qformer
  p, dv = v.num_tokens, v.width
  vit_layer = 2 * p * dv * 3 * dv + 2 * p * dv * dv + 4 * p * p * dv + 2 * 2 * p * dv * v.mlp_dim
  vision = stem_flops(v) + v.depth * vit_layer
  w, n = q.width, q.num_queries

  def qformer_pass(queries: int, text: int) -> float:
    total_len = queries + text
    per_layer = 2 * total_len * w * 4 * w + 4 * total_len * total_len * w + 2 * 2 * total_len * w * q.mlp_dim
    cross = 2 * queries * w * 2 * w + 2 * p * dv * 2 * w + 4 * queries * p * w if queries else 0
    return q.depth * per_layer + sum(q.has_cross_attention(i) for i in range(q.depth)) * cross

  if cfg.decoder is None:
    qformer = qformer_pass(0, length) + qformer_pass(n, length) + 3 * qformer_pass(n, length)
    qformer += 2 * length * w * w + 2 * length * w * q.vocab_size if "itg" in cfg.heads else 0
    return {"vision": float(vision), "qformer": float(qformer), "projector": 0.0, "lm": 0.0}
  d = cfg.decoder
  qformer = qformer_pass(n, instruction if cfg.instruction else 0)
  projector = 2 * n * w * d.width
  hk, gk, t = d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim, length
  mlp = (3 if d.mlp == "swiglu" else 2) * 2 * t * d.width * d.mlp_dim
  layer = 2 * t * d.width * hk + 2 * t * d.width * 2 * gk + 2 * t * hk * d.width + 4 * t * t * hk / 2 + mlp
  lm = d.depth * layer + 2 * t * d.width * d.vocab_size
  return {"vision": float(vision), "qformer": float(qformer), "projector": float(projector), "lm": float(lm)}


def train_flops(fwd: dict[str, float], trainable: frozenset) -> float:
  """x3 for a trained component, x2 for a frozen one a gradient passes through (a trained
  component upstream of it), x1 otherwise: the tower, the Q-Former, the projector, the LM."""
  total, upstream = 0.0, False
  for comp in blip2.COMPONENTS:
    train = comp in trainable
    total += (3 if train else 2 if upstream else 1) * fwd[comp]
    upstream |= train
  return total


# ---------------------------------------------------------------- stage 1 data

class CaptionPairBuilder(pairs.PairBuilder):
  """An image-text pair whose text starts with BOS (the [CLS] of ITC, the slot of ITG's [DEC])."""

  def build(self, record: dict, record_id: str = "?") -> dict:
    images = list(record.get("images", []))
    if len(images) != 1:
      raise data_lib.BadRecordError(record_id, "not_a_pair", f"{len(images)} images; an image-text pair has exactly one")
    text = pairs.caption_text(record["text"])
    if not text:
      raise data_lib.BadRecordError(record_id, "empty_text", f"text {record['text'][:80]!r} has no words")
    try:
      ids, mask, truncated = pairs.encode_text(self.tokenizer, text, self.text_length - 1, truncate=self.truncate)
    except ValueError as e:
      raise data_lib.BadRecordError(record_id, "text_too_long", f"{e} (BOS first)") from e
    try:
      pixels = decode_image(bytes(images[0]), self.image_size)
    except BadImageError as e:
      raise data_lib.BadRecordError(record_id, e.reason, str(e)) from e
    return {"images": pixels, "input_ids": np.concatenate([[self.tokenizer.bos_id], ids]).astype(np.int32),
            "text_mask": np.concatenate([[1], mask]).astype(np.int32), "text_truncated": np.float32(truncated)}


# ---------------------------------------------------------------- stage 2 data

IMAGE_POSITIONS = ("before_bos", "after_bos")


class Blip2Template(conversation.ChatTemplate):
  """BLIP-2's prompt: the round's images (Q placeholders each) and BOS, "Question: {words}
  Answer:" (the user's words without `<image>`), then " {a}" and the answer's end, which carry
  the loss. A caption request (`conversation.CAPTION_PROMPTS`) renders as BLIP-2's captioning,
  no question: the caption follows the image (LAVIS trains its stage 2 on captions without a
  prompt). Later rounds repeat the format without BOS.

  `image_position`: "before_bos" as Hugging Face's processor lays BLIP-2 out (the queries,
  then BOS and the text), "after_bos" where a decoder pretrained on the embedded documents saw
  its `<image>` token. `end`: "eos" (the tokenizer's end of sequence), or a text (LAVIS ends
  OPT's targets with "\n"; the embedded documents end each chunk with `<|endofchunk|>`), which
  a frozen LM already emits after an answer.
  """

  name = "blip2"

  def __init__(self, image_position: str = "before_bos", end: str = "eos"):
    if image_position not in IMAGE_POSITIONS:
      raise ValueError(f"data.image_position={image_position!r}; expected one of {IMAGE_POSITIONS}")
    if not end:
      raise ValueError("data.answer_end=''; expected 'eos' or the text that ends an answer")
    self.image_position, self.end = image_position, end

  def render(self, rounds):
    piece, bos = conversation.Piece, conversation.Special.BOS
    end = conversation.Special.EOS if self.end == "eos" else self.end
    pieces = []
    for r, turn in enumerate(rounds):
      images = turn.user.count(IMAGE_TOKEN)
      words = " ".join(turn.user.replace(IMAGE_TOKEN, " ").split())
      head = [piece(IMAGE_TOKEN * images, False, r)] if images else []
      if r == 0:
        head = [piece(bos, False, r)] + head if self.image_position == "after_bos" else head + [piece(bos, False, r)]
      pieces += head
      if words and words not in conversation.CAPTION_PROMPTS:
        pieces += [piece(f"Question: {words} Answer:", False, r), piece(f" {turn.assistant}", True, r)]
      else:
        pieces.append(piece(turn.assistant, True, r))
      pieces.append(piece(end, True, r))
    return pieces


def template_of(config: ml_collections.ConfigDict) -> Blip2Template:
  return Blip2Template(str(config.data.get("image_position", "before_bos")), str(config.data.get("answer_end", "eos")))


def stop_id(template: Blip2Template, tokenizer: data_lib.Tokenizer) -> int:
  """The id generation stops at: EOS, or the answer's end when it is one token."""
  if template.end == "eos":
    return tokenizer.eos_id
  ids = tokenizer.encode(template.end)
  if len(ids) != 1:
    raise ValueError(f"data.answer_end={template.end!r} is {len(ids)} tokens {ids}; generation stops at one id, "
                     "expected a text of one token (or 'eos')")
  return ids[0]


def instruction_of(record: dict) -> str:
  """InstructBLIP's instruction of a record: the words of its first user turn."""
  turns = conversation.conversation_turns(record)
  user = next((t.text for t in turns if t.role == "user"), "")
  return " ".join(user.replace(IMAGE_TOKEN, " ").split())


def encode_instruction(tokenizer: data_lib.Tokenizer, text: str, length: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids [L], mask [L]): BOS, the instruction's tokens (cut to fit), EOS, padding."""
  ids = [tokenizer.bos_id] + tokenizer.encode(text)[: length - 2] + [tokenizer.eos_id]
  out = np.full((length,), tokenizer.pad_id, np.int32)
  out[: len(ids)] = ids
  return out, (np.arange(length) < len(ids)).astype(np.int32)


class Blip2Builder(conversation.ConversationBuilder):
  """Conversation examples in a `Blip2Template`, one image slot of Q tokens; with
  `instruction_length`, InstructBLIP's instruction ids and mask too."""

  def __init__(self, tokenizer, text_length: int, image_size: int, num_queries: int, instruction_length: int = 0,
               template: Blip2Template | None = None, **kwargs):
    template = template or Blip2Template()
    super().__init__(tokenizer, template, text_length, 1, image_size, num_queries, **kwargs)
    self.instruction_length = instruction_length

  def _build(self, record: dict, record_id: str) -> dict:
    example = super()._build(record, record_id)
    if self.instruction_length:
      ids, mask = encode_instruction(self.tokenizer, instruction_of(record), self.instruction_length)
      example["instruction_ids"], example["instruction_mask"] = ids, mask
    return example


def builder_of(config: ml_collections.ConfigDict, cfg: blip2.Blip2Config, tokenizer) -> Blip2Builder:
  template = template_of(config)
  stop_id(template, tokenizer)  # a multi-token end is refused before training
  return Blip2Builder(tokenizer, int(config.data.text_length), cfg.vision.image_size, cfg.num_queries,
                      instruction_length(config) if cfg.instruction else 0, template)


def stage2_pipelines(config: ml_collections.ConfigDict, builder: Blip2Builder):
  d = common.data_dir(config)
  kwargs = dict(data_dir=d, batch_size=base.process_batch_size(config),
                shard_by_jax_process=bool(config.data.get("shard_by_process", True)),
                mixture=common.parse_mixture(str(config.data.get("mixture", "")) or DEFAULT_MIXTURE),
                max_consecutive_bad_records=int(config.data.get("max_consecutive_bad_records", 1000)))

  def train_data():
    return conversation.make_conversation_pipeline(builder, split="train", seed=int(config.seed),
                                                   num_workers=int(config.data.num_workers), **kwargs)

  def val_data():
    return conversation.make_conversation_pipeline(builder, split="validation", seed=0, num_epochs=1,
                                                   shuffle=False, **kwargs)

  return train_data, val_data


def abstract_batch(cfg: blip2.Blip2Config, batch: int, length: int, instruction: int = 32) -> dict:
  sds, s = jax.ShapeDtypeStruct, cfg.vision.image_size
  ints = lambda n: sds((batch, n), jnp.int32)  # noqa: E731
  if cfg.decoder is None:
    return {"images": sds((batch, s, s, 3), jnp.uint8), "input_ids": ints(length), "text_mask": ints(length)}
  out = {"images": sds((batch, 1, s, s, 3), jnp.uint8), "input_ids": ints(length), "targets": ints(length),
         "loss_mask": sds((batch, length), jnp.float32), "positions": ints(length), "segment_ids": ints(length)}
  if cfg.instruction:
    out.update(instruction_ids=ints(instruction), instruction_mask=ints(instruction))
  return out


# ---------------------------------------------------------------- generation

@functools.lru_cache(maxsize=32)
def decoding(cfg: blip2.Blip2Config) -> Decoding | None:
  """Cached generation of a stage-2 model (None for stage 1): the prefill encodes the image
  (and InstructBLIP's instruction) once and writes the query outputs over the prompt's
  placeholders; the steps read the KV cache only. Inputs: {"images": [B, S, S, 3] (or
  [B, 1, S, S, 3]), "instruction_ids", "instruction_mask" [B, L] for InstructBLIP}."""
  if cfg.decoder is None:
    return None
  module = blip2.Blip2(cfg)

  def prefill(params, inputs, ids, positions, lengths, cache):
    del lengths
    logits, cache = module.apply(params, stage2_images(inputs["images"]), ids, inputs.get("instruction_ids"),
                                 inputs.get("instruction_mask"), positions=positions, cache=cache)
    return logits, cache, ()

  def step(params, token, position, context, cache):
    del context
    return module.apply(params, token, positions=position, cache=cache, method="decode")

  def validate(inputs, prompt_ids):
    validate_inputs(cfg, inputs, prompt_ids)

  return Decoding(max_length=cfg.decoder.max_length, init_cache=lambda b, n: blip2.init_cache(cfg, b, n),
                  prefill=prefill, step=step, banned_ids=(cfg.image_token_id,), validate=validate)


def validate_inputs(cfg: blip2.Blip2Config, inputs, prompt_ids: np.ndarray) -> None:
  """ValueError naming what does not fit: no images or images of another shape, a missing
  instruction for InstructBLIP, a prompt without its Q placeholders."""
  if "images" not in inputs:
    raise ValueError(f"BLIP-2 generation needs inputs['images'] [B, S, S, 3]; got keys {sorted(inputs)}")
  images = np.asarray(inputs["images"])
  b = prompt_ids.shape[0]
  s = cfg.vision.image_size
  if images.ndim == 5 and images.shape[1] == 1:
    images = images[:, 0]
  if images.shape != (b, s, s, 3):
    raise ValueError(f"images have shape {np.asarray(inputs['images']).shape}; expected [{b}, {s}, {s}, 3]")
  if cfg.instruction and "instruction_ids" not in inputs:
    raise ValueError("InstructBLIP generation needs inputs['instruction_ids'] (and 'instruction_mask'): the "
                     "instruction its Q-Former reads")
  counts = (prompt_ids == cfg.image_token_id).sum(axis=1)
  bad = np.flatnonzero(counts != cfg.num_queries)
  if len(bad):
    raise ValueError(f"prompt {int(bad[0])} has {int(counts[bad[0]])} image placeholders (id {cfg.image_token_id}); "
                     f"expected {cfg.num_queries}, one per query")


# ---------------------------------------------------------------- adopting other runs

def _flat(tree) -> dict:
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _take(what: str, mine, theirs):
  """`theirs` (as jax arrays) when it has `mine`'s tree and shapes; ValueError naming the difference."""
  a, b = _flat(mine), _flat(theirs)
  missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
  if missing or extra:
    raise ValueError(f"{what} does not fit this BLIP-2's: missing {missing[:5]}, unexpected {extra[:5]}; expected "
                     "the same model settings")
  shape = lambda x: tuple(getattr(x, "shape", np.shape(x)))  # noqa: E731  (arrays or ShapeDtypeStructs)
  bad = [k for k in a if shape(a[k]) != shape(b[k])]
  if bad:
    raise ValueError(f"{what} has other shapes at {bad[:5]} (e.g. {bad[0]}: {shape(b[bad[0]])} vs "
                     f"{shape(a[bad[0]])}); expected the same model settings")
  return jax.tree.map(jnp.asarray, theirs)


def _subset(what: str, mine: dict, theirs: dict) -> dict:
  """The entries of `theirs` that `mine` has (recursively), each of `mine`'s shape; ValueError
  when `theirs` lacks one of `mine`'s."""
  out = {}
  for key, value in mine.items():
    if key not in theirs:
      raise ValueError(f"{what} has no {key!r}; expected the same model settings")
    out[key] = _subset(f"{what}[{key!r}]", value, theirs[key]) if isinstance(value, dict) else \
        _take(f"{what}[{key!r}]", value, theirs[key])
  return out


def adopt_params(params: dict, family: str, other: dict) -> dict:
  """BLIP-2 params with another run's in place: an `lm` run's decoder, a `contrastive` run's
  image tower, or a `blip2` run's tower, queries and Q-Former (stage 2 from stage 1: the
  Q-Former's text embeddings and feed-forwards and the stage-1 heads are left behind when
  this model has none, as LAVIS's stage 2 drops them)."""
  if family == "lm":
    if "decoder" not in params:
      raise ValueError("an 'lm' run's decoder was given to a BLIP-2 without one (the stage-1 model); expected a "
                       "stage-2 config")
    return {**params, "decoder": _take("the lm run's decoder", params["decoder"], other["decoder"])}
  if family == "contrastive":
    return {**params, "vision": _take("the contrastive run's vision tower", params["vision"], other["vision"])}
  if family == "blip2":
    shared = ("vision", "query_tokens", "qformer") + tuple(k for k in blip2.HEAD_PARAMS if k in params)
    taken = _subset("the blip2 run's parameters", {k: params[k] for k in shared if k in params}, other)
    if "language_projection" in params and "language_projection" in other:
      taken["language_projection"] = _take("the blip2 run's language_projection", params["language_projection"],
                                           other["language_projection"])
    if "decoder" in params and "decoder" in other:
      taken["decoder"] = _take("the blip2 run's decoder", params["decoder"], other["decoder"])
    return {**params, **taken}
  raise ValueError(f"a BLIP-2 run can start from an 'lm', a 'contrastive' or a 'blip2' run's checkpoint; got one of "
                   f"family {family!r}")


# ---------------------------------------------------------------- the task

def blip2_task(config: ml_collections.ConfigDict, workdir: str | None = None) -> base.Task:
  """The loop's Task for `config`; with `workdir`, on the tokenizer that work directory trains with."""
  from mmjax.families.blip2 import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  tokenizer_bytes = common.read_tokenizer(config, workdir)
  tokenizer = data_lib.Tokenizer(tokenizer_bytes)
  cfg = model_config(config, tokenizer)
  check_config(config, cfg)
  length = int(config.data.text_length)
  n_instr = instruction_length(config) if cfg.instruction else 0
  model = Model(cfg, length, n_instr)
  d = common.data_dir(config)
  fwd = forward_flops(cfg, length, n_instr)
  common_fields = dict(init_params=model.init, apply_fn=model.apply, param_labels=blip2.param_labels,
                       flops_per_example=lambda trainable: train_flops(fwd, trainable), boxed_params=model.boxed,
                       workdir_files=lambda: {common.TOKENIZER_COPY: tokenizer_bytes}, components=blip2.COMPONENTS,
                       tokenizer=tokenizer, data_dir=d, adopt_params=adopt_params, param_metrics=param_metrics)
  if cfg.decoder is None:
    weights = loss_weights(config, cfg)
    builder = CaptionPairBuilder(tokenizer, length, cfg.vision.image_size,
                                 truncate=bool(config.data.get("truncate_text", False)))
    bucket = data_lib.Bucket(max_images=1, text_length=length, image_size=cfg.vision.image_size)
    train_data, val_data = common.pipelines(config, tokenizer, bucket, builder=builder,
                                            default_mixture=pairs.DEFAULT_MIXTURE)
    return base.Task(train_data=train_data, val_data=val_data,
                     loss_fn=lambda params, batch, rng: losses.stage1_loss(model.module, params, batch, rng, weights),
                     evaluate=lambda params: evaluate_lib.evaluate_stage1(config, model, tokenizer, params),
                     **common_fields)
  builder = builder_of(config, cfg, tokenizer)
  train_data, val_data = stage2_pipelines(config, builder)
  return base.Task(train_data=train_data, val_data=val_data, decoding=decoding(cfg),
                   evaluate=lambda params: evaluate_lib.evaluate_stage2(config, cfg, builder, params),
                   render_prompt=lambda prompt, images: evaluate_lib.render_prompt(cfg, builder, prompt, images),
                   **common_fields)


def abstract(config: ml_collections.ConfigDict) -> base.AbstractModel:
  cfg = model_config(config)
  length = int(config.data.text_length)
  n_instr = instruction_length(config) if cfg.instruction else 0
  model = Model(cfg, length, n_instr)
  weights = loss_weights(config, cfg) if cfg.decoder is None else None
  loss_fn = None
  if weights is not None:
    loss_fn = lambda params, batch, rng: losses.stage1_loss(model.module, params, batch, rng, weights)  # noqa: E731
  return base.AbstractModel(
      config=cfg, init_params=model.init, apply_fn=model.apply, boxed_params=model.boxed,
      param_labels=blip2.param_labels, loss_fn=loss_fn, param_metrics=param_metrics,
      abstract_batch=lambda batch, length_, num_images: abstract_batch(cfg, batch, length_, n_instr or 32))


def override(preset: blip2.Blip2Config, **overrides) -> blip2.Blip2Config:
  """`dataclasses.replace` with the nested configs given as dicts of their fields too."""
  nested = {"vision": ViTConfig, "qformer": QFormerConfig, "decoder": DecoderConfig}
  for key, cls in nested.items():
    if isinstance(overrides.get(key), dict):
      base_cfg = getattr(preset, key)
      overrides[key] = dataclasses.replace(base_cfg, **overrides[key]) if base_cfg is not None else cls(**overrides[key])
  return dataclasses.replace(preset, **overrides).validate()
