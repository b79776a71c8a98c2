"""What `mmjax eval` and `mmjax generate` ask of a BLIP-2 run.

Stage 1 (`evaluate_stage1`), on the validation image-text pairs, as BLIP-2 evaluates
retrieval: every image against every text by ITC (the best query's cosine), recall@1/5/10
both ways; then the k best of each row re-ranked by ITM (the matched logit plus the ITC
cosine, LAVIS's `compute_sim_matrix`), recall again; and ITM accuracy on each image with its
own text (matched) and with a text of another scene drawn at random (not matched), against
50%. Chance at k is k / N. A query counts as found at k when its own pair ranks within k,
ties against it (`recall_at`).

Stage 2 (`evaluate_stage2`): exact match on the embedded validation questions, each asked as
training asked it (the Q placeholders, BOS, "Question: {q} Answer:"; InstructBLIP's Q-Former
also reads the question), greedy, up to EOS; and CIDEr-D of the captions generated for the
first 100 validation images (the Q placeholders and BOS, no question, as stage 2 trains a
caption) against each image's caption.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import data as data_lib
from mmjax import infer
from mmjax.data import conversation, pairs
from mmjax.data import qa as qa_lib
from mmjax.data.preprocess import BadImageError, decode_image
from mmjax.data.scenes import END_OF_CHUNK_TOKEN, IMAGE_TOKEN
from mmjax.evaluation import captions as caption_metrics
from mmjax.evaluation.retrieval import RECALL_AT, recall_at
from mmjax.families import common

# Rows scored per jitted call (the last chunk padded): one compile per shape.
CHUNK = 100
_log = logging.getLogger(__name__)


def _chunked(fn, params, *arrays, chunk: int = CHUNK) -> np.ndarray:
  n, out = arrays[0].shape[0], []
  for start in range(0, n, chunk):
    part = [a[start:start + chunk] for a in arrays]
    pad = chunk - part[0].shape[0] if n > chunk else 0
    part = [np.concatenate([p, np.repeat(p[-1:], pad, 0)]) if pad else p for p in part]
    out.append(np.asarray(fn(params, *part))[: chunk - pad])
  return np.concatenate(out)


def validation_pairs(config: ml_collections.ConfigDict, tokenizer, image_size: int, limit: int = 0):
  """(images uint8 [N, S, S, 3], ids [N, T], masks [N, T]) of the validation pairs of the
  mixture's datasets, texts as stage 1 trains on them (cut to fit); non-pairs skipped."""
  from mmjax.families.blip2.task import CaptionPairBuilder  # pylint: disable=g-import-not-at-top
  d = common.data_dir(config)
  mixture = common.parse_mixture(str(config.data.get("mixture", "")) or pairs.DEFAULT_MIXTURE)
  names = list(mixture) if isinstance(mixture, dict) else ["captions"]
  builder = CaptionPairBuilder(tokenizer, int(config.data.text_length), image_size, truncate=True)
  images, ids, masks, skipped = [], [], [], 0
  for name in names:
    try:
      source = data_lib.open_split(d, name, "validation")
    except (KeyError, ValueError, OSError):
      continue
    for i in range(len(source)):
      if limit and len(images) >= limit:
        break
      try:
        ex = builder.build(source[i], str(i))
      except (data_lib.BadRecordError, BadImageError):
        skipped += 1
        continue
      images.append(ex["images"])
      ids.append(ex["input_ids"])
      masks.append(ex["text_mask"])
  if skipped:
    _log.warning("evaluation skipped %d validation records that are not image-text pairs", skipped)
  if not images:
    raise ValueError(f"no image-text pairs in the validation splits of {names} in {d!r}")
  return np.stack(images), np.stack(ids), np.stack(masks)


def retrieval_scores(model, params, images: np.ndarray, ids: np.ndarray, masks: np.ndarray) -> dict:
  """{"itc" [N, N] (image i, text j: the best query's cosine), "features" the tower's
  [N, P, E]} of the pairs."""
  module = model.module
  image_fn = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode_image"))
  text_fn = jax.jit(lambda p, i, m: module.apply({"params": p}, i, m, method="encode_text"))
  feat_fn = jax.jit(lambda p, x: module.apply({"params": p}, x, method="image_features"))
  image_embeds = _chunked(image_fn, params, images)  # [N, Q, F]
  text_embeds = _chunked(text_fn, params, ids, masks)  # [N, F]
  itc = np.einsum("iqf,jf->ijq", image_embeds.astype(np.float64), text_embeds.astype(np.float64)).max(axis=-1)
  return {"itc": itc, "features": _chunked(feat_fn, params, images)}


def itm_scores(model, params, features: np.ndarray, ids: np.ndarray, masks: np.ndarray,
               image_index: np.ndarray, text_index: np.ndarray) -> np.ndarray:
  """ITM logits [M, 2] of the pairs (features[image_index[m]], text text_index[m])."""
  fn = jax.jit(lambda p, f, i, m: model.module.apply({"params": p}, f, i, m, method="match"))
  return _chunked(lambda p, a, b: fn(p, jnp.asarray(features)[a], jnp.asarray(ids)[b], jnp.asarray(masks)[b]),
                  params, image_index, text_index)


def rerank(itc: np.ndarray, itm_matched, k: int) -> np.ndarray:
  """Scores [N, C] where each row's k best by ITC take ITC + the ITM matched logit
  (`itm_matched(rows, columns)` -> [M]) and the rest -inf (never ahead of a re-ranked one)."""
  k = min(k, itc.shape[1])
  top = np.argsort(-itc, axis=1, kind="stable")[:, :k]
  rows = np.repeat(np.arange(itc.shape[0]), k)
  cols = top.reshape(-1)
  out = np.full(itc.shape, -np.inf)
  out[rows, cols] = itc[rows, cols] + itm_matched(rows, cols)
  return out


def evaluate_stage1(config: ml_collections.ConfigDict, model, tokenizer, params) -> dict:
  """`Task.evaluate` of a stage-1 run (module docstring): flat dict of floats."""
  cfg = model.config
  images, ids, masks = validation_pairs(config, tokenizer, cfg.vision.image_size,
                                        int(config.eval.get("num_pairs", 0)))
  blank = bool(config.data.get("blank_images", False))
  if blank:
    images = np.zeros_like(images)
  n = images.shape[0]
  out: dict = {"pairs": n, "blank_images": blank}
  exact = np.eye(n, dtype=bool)
  scores = retrieval_scores(model, params, images, ids, masks)
  itc = scores["itc"]
  for name, s in (("i2t", itc), ("t2i", itc.T)):
    for k, r in recall_at(s, exact).items():
      out[f"itc_{name}_r@{k}"] = r
  for k in RECALL_AT:
    out[f"chance_r@{k}"] = min(k / n, 1.0)
  if "itm" not in cfg.heads:
    return out
  k = int(config.eval.get("rerank_k", 16))
  feats = scores["features"]
  matched = lambda a, b: itm_scores(model, params, feats, ids, masks, a, b)[:, 1]  # noqa: E731
  i2t = rerank(itc, matched, k)
  t2i = rerank(itc.T, lambda a, b: matched(b, a), k)
  for name, s in (("i2t", i2t), ("t2i", t2i)):
    for kk, r in recall_at(s, exact).items():
      out[f"itm_{name}_r@{kk}"] = r
  out["rerank_k"] = min(k, n)
  # ITM accuracy: each image with its own text, and with a text whose tokens differ.
  rng = np.random.default_rng(0)
  negatives = np.empty(n, np.int64)
  for i in range(n):
    other = np.flatnonzero(np.any(ids != ids[i], axis=1))
    negatives[i] = rng.choice(other) if len(other) else (i + 1) % n
  logits = itm_scores(model, params, feats, ids, masks, np.concatenate([np.arange(n), np.arange(n)]),
                      np.concatenate([np.arange(n), negatives]))
  labels = np.concatenate([np.ones(n, int), np.zeros(n, int)])
  out["itm_accuracy"] = float(np.mean(np.argmax(logits, axis=1) == labels))
  out["itm_accuracy_chance"] = 0.5
  return out


# ---------------------------------------------------------------- stage 2

def prompt_ids(cfg, builder, prompt: str) -> list[int]:
  """The ids of a one-round prompt as training renders it up to the answer, each `<image>`
  expanded to the Q placeholders."""
  pieces = builder.template.render([conversation.Round(prompt, "")])
  first_answer = next(i for i, p in enumerate(pieces) if p.trainable)
  ids, _, _ = builder._tokenize(pieces[:first_answer])  # pylint: disable=protected-access
  out = []
  for i in ids:
    out += [cfg.image_token_id] * cfg.num_queries if i == builder.tokenizer.image_id else [i]
  return out


def render_prompt(cfg, builder, prompt: str, images: list):
  """`Task.render_prompt`: ({"images" [1, S, S, 3] (+ the instruction)}, ids Int[T], EOS id)."""
  from mmjax.families.blip2 import task as task_lib  # pylint: disable=g-import-not-at-top
  n = prompt.count(IMAGE_TOKEN)
  if n != 1 or len(images) != 1:
    raise ValueError(f"a BLIP-2 prompt holds one <image> and one image is given; got {n} <image> and "
                     f"{len(images)} images")
  pixels = _square(np.asarray(images[0], np.uint8), cfg.vision.image_size)
  inputs = {"images": pixels[None]}
  if cfg.instruction:
    words = " ".join(prompt.replace(IMAGE_TOKEN, " ").split())
    i_ids, i_mask = task_lib.encode_instruction(builder.tokenizer, words, builder.instruction_length)
    inputs.update(instruction_ids=i_ids[None], instruction_mask=i_mask[None])
  return inputs, np.asarray(prompt_ids(cfg, builder, prompt), np.int32), task_lib.stop_id(builder.template,
                                                                                          builder.tokenizer)


def _square(image: np.ndarray, size: int) -> np.ndarray:
  slots, _ = conversation.SquareSlots(size, 1)(image, 0)
  return np.asarray(slots[0], np.uint8)


def _generate(config: ml_collections.ConfigDict, cfg, builder, params, rendered: list, max_new_tokens: int,
              batch: int = 64) -> list[str]:
  """The decoded greedy continuation of each `render_prompt` output, up to its stop id, in
  batches of `batch` (the last padded by repeating its final prompt: one compile per shape);
  the images blanked when the run's `data.blank_images` is set."""
  from mmjax.families.blip2 import task as task_lib  # pylint: disable=g-import-not-at-top
  blank = bool(config.data.get("blank_images", False))
  tok = builder.tokenizer
  generator = infer.Generator(task_lib.decoding(cfg))
  longest = max(len(r[1]) for r in rendered)
  texts = []
  for start in range(0, len(rendered), batch):
    chunk = rendered[start:start + batch]
    b = batch if len(rendered) > batch else len(chunk)
    ids = np.full((b, longest), tok.pad_id, np.int32)
    lengths = np.ones((b,), np.int32)
    inputs = {k: np.concatenate([chunk[min(i, len(chunk) - 1)][0][k] for i in range(b)]) for k in chunk[0][0]}
    for i in range(b):
      p = chunk[min(i, len(chunk) - 1)][1]
      ids[i, :len(p)] = p
      lengths[i] = len(p)
    if blank:
      inputs["images"] = np.zeros_like(inputs["images"])
    result = generator.generate({"params": params}, inputs, ids, max_new_tokens,
                                prompt_lengths=lengths, eos_token_id=chunk[0][2], pad_id=tok.pad_id)
    texts += [tok.decode([int(t) for t in result.tokens[i, :result.lengths[i]]]) for i in range(len(chunk))]
  return texts


def qa_exact_match(config: ml_collections.ConfigDict, cfg, builder, params, limit: int = 0,
                   batch: int = 64) -> tuple[float, list[dict]]:
  """Exact match on the validation questions of the data directory's `qa` (module docstring)."""
  source = data_lib.open_split(common.data_dir(config), "qa", "validation")
  count = len(source) if not limit else min(limit, len(source))
  records, rendered = [], []
  for i in range(count):
    record = source[i]
    user = conversation.conversation_turns(record)[0]
    image = decode_image(bytes(record["images"][0]), None)
    rendered.append(render_prompt(cfg, builder, user.text, [image]))
    records.append(record)
  answers = _generate(config, cfg, builder, params, rendered, int(config.eval.get("max_new_tokens", 6)), batch)
  return common.qa_rows(records, answers)


# Longest embedded caption (22 tokens) and its end.
CAPTION_TOKENS = 24


def caption_cider(config: ml_collections.ConfigDict, cfg, builder, params, limit: int = 100,
                  batch: int = 64) -> tuple[float, list[dict]]:
  """CIDEr-D (`mmjax.evaluation.captions`, pycocoevalcap's scorer) of the captions generated
  for the first `limit` validation images of the data directory's `captions`, each asked as
  stage 2 trains a caption (the image, BOS, no question), against the image's caption."""
  source = data_lib.open_split(common.data_dir(config), "captions", "validation")
  count = min(limit, len(source)) if limit else len(source)
  refs, rendered = [], []
  for i in range(count):
    record = source[i]
    image = decode_image(bytes(record["images"][0]), None)
    rendered.append(render_prompt(cfg, builder, f"{IMAGE_TOKEN}\n{conversation.CAPTION_PROMPTS[0]}", [image]))
    refs.append([pairs.caption_text(record["text"])])
  # The embedded captions end with `<|endofchunk|>`, which a reading LM writes before EOS.
  captions = [" ".join(c.split(END_OF_CHUNK_TOKEN)[0].split())
              for c in _generate(config, cfg, builder, params, rendered, CAPTION_TOKENS, batch)]
  score, per_caption = caption_metrics.cider_d([caption_metrics.tokenize(c) for c in captions],
                                              [[caption_metrics.tokenize(r) for r in rs] for rs in refs])
  rows = [{"caption": r[0], "generated": c, "cider": float(s)} for r, c, s in zip(refs, captions, per_caption)]
  return float(score), rows


def evaluate_stage2(config: ml_collections.ConfigDict, cfg, builder, params) -> dict:
  """`Task.evaluate` of a stage-2 run: QA exact match (overall and by kind) with a few
  examples, when the data directory has the embedded questions; {} otherwise."""
  if "qa" not in data_lib.dataset_names(common.data_dir(config)):
    return {}
  acc, rows = qa_exact_match(config, cfg, builder, params, int(config.eval.get("num_questions", 0)))
  res = {"blank_images": bool(config.data.get("blank_images", False)), "qa_exact_match": acc,
         "qa_by_kind": qa_lib.accuracy_by_kind(rows), "examples": rows[:8]}
  if "captions" in data_lib.dataset_names(common.data_dir(config)):
    res["cider"], caption_rows = caption_cider(config, cfg, builder, params)
    res["caption_examples"] = caption_rows[:4]
  return res
