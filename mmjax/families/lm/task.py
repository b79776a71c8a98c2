"""The `lm` task: a decoder-only LM on the text of a data directory's datasets (the
embedded dataset's captions and questions with their `<image>` tokens dropped, or a
user's imported JSONL text), next-token loss over the text.

`data.describe_images` (a probability, default 0) puts a caption of each image's scene where
its `<image>` stood, in that share of the embedded records: "<s>there are 2 shapes: a red
circle and a blue square.Question: what colour is the rightmost shape? Answer: blue". An LM
trained on only the embedded text never needs what precedes a question (nothing there says
what the image holds), and learns to ignore it; one trained on described images learns to
read the description, which is what a frozen LM behind a bridge (BLIP-2's stage 2) has to
do with the query outputs that replace it. `data.caption_loss` (default true): false leaves
the captions' own tokens out of the loss (a random scene's caption cannot be predicted; the
LM has to read it, not guess it), so the loss is on the text around them and the answers.

`config.model` is {"family": "lm", "decoder": every DecoderConfig field}; the vocabulary
size comes from the tokenizer and the compute dtype from `config.mixed_precision`.
"""

from __future__ import annotations

import functools
import zlib

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import data as data_lib
from mmjax.families import base, common
from mmjax.families.lm import model as lm
from mmjax.data import qa as qa_lib
from mmjax.data import scenes as scenes_lib
from mmjax import infer
from mmjax.infer import Decoding
from mmjax.models.decoder import DecoderConfig, init_decoder_cache
from mmjax.models.scan_layout import scan_plan


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> lm.LMConfig:
  m = config.model.to_dict()
  unknown = sorted(set(m) - {"family", "decoder"})
  if unknown:
    raise ValueError(f"config.model has fields {unknown} that family 'lm' does not; expected ['decoder', 'family']")
  dtype = str(config.mixed_precision.compute_dtype)
  remat = str(config.train.remat) == "layers" or bool(m["decoder"].get("remat", False))
  return lm.LMConfig(common.replace_fields(DecoderConfig, m["decoder"], "decoder", dtype=dtype,
                                           vocab_size=vocab_size, remat=remat))


def bucket(config: ml_collections.ConfigDict) -> data_lib.Bucket:
  """Text only (no image slots): `data.text_length` tokens per example."""
  return data_lib.Bucket(max_images=0, text_length=int(config.data.text_length))


class DescribingBuilder(data_lib.ExampleBuilder):
  """The text-only example builder with each `<image>` replaced, with probability
  `describe`, by a caption of its scene (the record's `scenes`), else dropped as usual.

  The caption and the draw depend on the record's id and `seed` only, so an example is the
  same at every epoch and after a resume. Each piece of text between images is encoded on
  its own, as the image buckets encode it: the question after a caption has the same ids as
  after an image.
  """

  def __init__(self, tokenizer: data_lib.Tokenizer, bucket: data_lib.Bucket, describe: float, seed: int,
               more_questions: int = 0, caption_loss: bool = True):
    super().__init__(tokenizer, bucket)
    if not 0.0 <= describe <= 1.0:
      raise ValueError(f"data.describe_images={describe}; expected a probability in [0, 1]")
    if more_questions < 0:
      raise ValueError(f"data.more_questions={more_questions}; expected >= 0")
    self.describe, self.seed, self.more_questions = describe, seed, more_questions
    self.caption_loss = caption_loss

  def _build_text(self, record: dict, record_id: str) -> dict:
    tok = self.tokenizer
    text = record["text"].decode() if isinstance(record["text"], bytes) else str(record["text"])
    keys = [k.decode() if isinstance(k, bytes) else str(k) for k in record.get("scenes", [])]
    pieces = text.split(data_lib.IMAGE_TOKEN)
    if len(keys) != len(pieces) - 1:
      raise ValueError(f"record {record_id}: data.describe_images={self.describe} needs the scene of every "
                       f"image (the embedded dataset's `scenes`); it has {len(pieces) - 1} <image> and "
                       f"{len(keys)} scenes")
    rng = np.random.default_rng([self.seed, zlib.crc32(record_id.encode())])
    ids = tok.encode(pieces[0])
    described, captions = [], []  # captions: [start, end) of each caption's ids in `ids`
    for key, piece in zip(keys, pieces[1:]):
      if rng.random() < self.describe:
        described.append(scenes_lib.Scene.from_key(key))
        start = len(ids)
        ids += tok.encode(scenes_lib.left_to_right(described[-1]))
        captions.append((start, len(ids)))
      ids += tok.encode(piece)
    if len(keys) == 1 and described and record.get("question"):
      # More questions about the one described scene, none asked twice: more answers to read
      # per sequence, none of which an earlier answer gives away.
      asked = {record["question"].decode() if isinstance(record["question"], bytes) else str(record["question"])}
      for _ in range(self.more_questions):
        drawn = scenes_lib.sample_question(described[0], rng, exclude=asked)
        if drawn is None:
          break
        _, question, answer = drawn
        asked.add(question)
        ids += tok.encode(data_lib.qa_prompt(question, answer).replace(data_lib.IMAGE_TOKEN, ""))
    if all(i == tok.end_of_chunk_id for i in ids):
      raise data_lib.BadRecordError(record_id, "empty_text", f"text {text[:80]!r} has no words")
    example = self._sequence(([tok.bos_id] + ids + [tok.eos_id])[:self.bucket.text_length])
    if not self.caption_loss:
      # ids[i] is the target at position i (the sequence starts with BOS).
      for start, end in captions:
        example["loss_mask"][start:end] = 0.0
    return example


def reading_accuracy(config: ml_collections.ConfigDict, cfg: lm.LMConfig, tokenizer: data_lib.Tokenizer,
                     params, limit: int = 0, batch: int = 64) -> dict:
  """QA exact match of the LM on the embedded validation questions, each after a caption of
  its scene (`described`) and with no caption (`bare`, the questions alone: the text's
  prior; the answers are balanced, so chance is what `bare` should reach). An LM that reads
  answers the described questions; {} when the data directory has no `qa`."""
  d = common.data_dir(config)
  if "qa" not in data_lib.dataset_names(d):
    return {}
  source = data_lib.open_split(d, "qa", "validation")
  count = len(source) if not limit else min(limit, len(source))
  tok = tokenizer
  generator = infer.Generator(decoding(cfg))
  prompts = {"described": [], "bare": []}
  truths, questions = [], []
  for i in range(count):
    record = source[i]
    question, answer = (record[k].decode() for k in ("question", "answer"))
    scene = scenes_lib.Scene.from_key(record["scenes"][0].decode())
    query = tok.encode(data_lib.qa_prompt(question).replace(data_lib.IMAGE_TOKEN, ""))
    prompts["described"].append([tok.bos_id] + tok.encode(scenes_lib.left_to_right(scene)) + query)
    prompts["bare"].append([tok.bos_id] + query)
    truths.append(answer)
    questions.append(question)
  res = {}
  for name, rows in prompts.items():
    predictions = []
    for start in range(0, count, batch):
      chunk = rows[start:start + batch]
      ids = np.full((batch, max(len(r) for r in rows)), tok.pad_id, np.int32)
      lengths = np.ones((batch,), np.int32)
      for j in range(batch):
        p = chunk[min(j, len(chunk) - 1)]
        ids[j, :len(p)], lengths[j] = p, len(p)
      out = generator.generate({"params": params}, None, ids, 4, prompt_lengths=lengths,
                               eos_token_id=tok.end_of_chunk_id, pad_id=tok.pad_id)
      predictions += [tok.decode([int(t) for t in out.tokens[j, :out.lengths[j]]]) for j in range(len(chunk))]
    rows = [{"question": q, "correct": data_lib.exact_match(p, t)} for q, p, t in zip(questions, predictions, truths)]
    res[f"reading_qa_{name}"] = float(np.mean([r["correct"] for r in rows]))
    res[f"reading_qa_{name}_by_kind"] = qa_lib.accuracy_by_kind(rows)
  return res


def abstract_batch(batch: int, length: int) -> dict:
  sds = jax.ShapeDtypeStruct
  return {"input_ids": sds((batch, length), jnp.int32), "targets": sds((batch, length), jnp.int32),
          "loss_mask": sds((batch, length), jnp.float32)}


class Model:
  """The LM with unboxed float32 parameters: init(key) -> params, apply(params, batch) -> logits."""

  def __init__(self, cfg: lm.LMConfig, length: int):
    self.config = cfg
    self.module = lm.LanguageModel(cfg)
    self._ids = jnp.zeros((1, length), jnp.int32)

  def init(self, key):
    return flax.core.meta.unbox(self.module.init(key, self._ids)["params"])

  def boxed(self, key):
    return jax.eval_shape(self.module.init, key, self._ids)["params"]

  def apply(self, params, batch, rng=None):
    del rng  # no dropout
    logits, _ = self.module.apply({"params": params}, batch["input_ids"])
    return logits


def forward_flops(cfg: lm.LMConfig, length: int) -> float:
  """Forward matmul FLOPs of one example (2mnk per matmul, causal attention counted half)."""
  d = cfg.decoder
  w, hk, gk = d.width, d.num_heads * d.head_dim, d.num_kv_heads * d.head_dim
  layer = 2 * length * w * hk + 2 * length * w * 2 * gk + 2 * length * hk * w + 4 * length * length * hk / 2 \
      + 3 * 2 * length * w * d.mlp_dim
  return float(d.depth * layer + 2 * length * w * d.vocab_size)


def train_flops(cfg: lm.LMConfig, length: int, trainable: frozenset) -> float:
  """x3 when the LM trains (forward, input and weight gradients), x1 when frozen."""
  return (3.0 if "lm" in trainable else 1.0) * forward_flops(cfg, length)


@functools.lru_cache(maxsize=32)
def decoding(cfg: lm.LMConfig) -> Decoding:
  """Cached generation: nothing but the KV cache (the context is empty)."""
  module = lm.LanguageModel(cfg)

  def prefill(params, inputs, ids, positions, lengths, cache):
    del inputs, lengths
    logits, cache = module.apply(params, ids, positions=positions, cache=cache)
    return logits, cache, ()

  def step(params, token, position, context, cache):
    del context
    return module.apply(params, token, positions=position, cache=cache)

  def validate(inputs, prompt_ids):
    if inputs:
      raise ValueError(f"an lm model takes no inputs besides the prompt; got {sorted(inputs)}")
    bad = (prompt_ids < 0) | (prompt_ids >= cfg.decoder.vocab_size)
    if bad.any():
      where = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"token id {int(prompt_ids[where])} at {where} is outside the vocabulary "
                       f"[0, {cfg.decoder.vocab_size})")

  return Decoding(max_length=cfg.decoder.max_length,
                  init_cache=lambda batch, length: init_decoder_cache(cfg.decoder, batch, length),
                  prefill=prefill, step=step, validate=validate)


def uncounted_flops(cfg: lm.LMConfig, trainable: frozenset, batch: int, length: int, chips: int) -> float:
  """FLOPs per chip XLA's cost analysis misses with ``scan_layers`` (it counts a loop body
  once): (blocks - 1) x one layer's train-step FLOPs (+1 forward with remat)."""
  d = cfg.decoder
  plan = scan_plan(d.depth)
  if not d.scan_layers or plan.num_blocks < 2:
    return 0.0
  per_layer = (forward_flops(cfg, length) - 2 * length * d.width * d.vocab_size) / d.depth
  mult = (3 if "lm" in trainable else 1) + (1 if d.remat else 0)
  return (plan.num_blocks - 1) * mult * per_layer * batch / chips


def lm_task(config: ml_collections.ConfigDict, workdir: str | None = None) -> base.Task:
  """The loop's Task for `config`; with `workdir`, on the tokenizer that work directory trains with."""
  tokenizer_bytes = common.read_tokenizer(config, workdir)
  tokenizer = data_lib.Tokenizer(tokenizer_bytes)
  cfg = model_config(config, tokenizer.vocab_size)
  bk = bucket(config)
  model = Model(cfg, bk.text_length)
  d = common.data_dir(config)
  describe = float(config.data.get("describe_images", 0.0))
  builder = (DescribingBuilder(tokenizer, bk, describe, int(config.seed), int(config.data.get("more_questions", 0)),
                               bool(config.data.get("caption_loss", True)))
             if describe != 0 else None)
  train_data, val_data = common.pipelines(config, tokenizer, bk, builder=builder)

  def evaluate(params):
    if not describe:
      return {}
    return reading_accuracy(config, cfg, tokenizer, params, int(config.eval.get("num_questions", 0)))

  return base.Task(init_params=model.init, apply_fn=model.apply, param_labels=lm.param_labels,
                   train_data=train_data, val_data=val_data,
                   flops_per_example=lambda trainable: train_flops(cfg, bk.text_length, trainable),
                   boxed_params=model.boxed, workdir_files=lambda: {common.TOKENIZER_COPY: tokenizer_bytes},
                   components=lm.COMPONENTS, tokenizer=tokenizer, data_dir=d, decoding=decoding(cfg),
                   evaluate=evaluate)
