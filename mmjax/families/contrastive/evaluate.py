"""Evaluation of a contrastive model: retrieval both ways and zero-shot classification.

Retrieval (`retrieval`): every validation image against every validation text of the pair
datasets, recall@1/5/10 image->text and text->image. A query counts as found at k when its
own pair is among the k best; ties count against it (a text identical to the right one and
scored the same ranks ahead of it), so the figure never flatters. On the embedded scenes
the `content` figures also count a retrieved item whose scene holds the same shapes in the
same colours left to right (what a caption can say: two such scenes differ only in where
and how big the shapes are, and one-shape scenes often share a caption word for word).
Chance is k / N.

Zero-shot classification (`zero_shot`) on the embedded validation scenes, CLIP's way: each
class is the normalised mean of its prompts' text embeddings (an ensemble of templates),
each image takes the class of highest cosine. Tasks (the classes and templates are in
`ZERO_SHOT_TASKS`): the number of shapes (1-4), the colour of the leftmost shape (5), and
whether a red circle is present (2: its prompts against those of the 14 other coloured
shapes). Each accuracy is reported with chance (1 / classes) and the majority-class rate.

Dimension letters: N validation pairs, E embedding width, C classes.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from mmjax import data as data_lib
from mmjax.data import pairs, scenes
from mmjax.data.preprocess import BadImageError
from mmjax.evaluation.retrieval import RECALL_AT, recall_at
from mmjax.families import common

_log = logging.getLogger(__name__)


def parse_scene_key(key: str) -> tuple[tuple[str, str], ...]:
  """((shape, colour), ...) left to right, from a `scenes.Scene.key`."""
  out = []
  for part in key.split("|")[3:]:
    shape = {s[0]: s for s in scenes.SHAPES}[part[0]]
    colour = next(c for c in scenes.COLOURS if part[1:].startswith(c))
    out.append((shape, colour))
  return tuple(out)


def _count_templates(n: int) -> list[str]:
  noun = "shape" if n == 1 else "shapes"
  return [f"there {'is' if n == 1 else 'are'} {n} {noun}.", f"there {'is' if n == 1 else 'are'} {n} {noun}:",
          f"a picture of {n} {noun}."]


def _leftmost_templates(colour: str) -> list[str]:
  return [t for s in scenes.SHAPES for t in (f"from left to right: a {colour} {s}", f"a {colour} {s} on the left")]


def _single(colour: str, shape: str) -> list[str]:
  return [f"a picture of a {colour} {shape}.", f"from left to right: a {colour} {shape}.",
          f"there is a {colour} {shape}"]


# task -> (class names, class -> prompts, scene -> class name)
ZERO_SHOT_TASKS = {
    "count": (["1", "2", "3", "4"], lambda c: _count_templates(int(c)), lambda s: str(len(s))),
    "leftmost_colour": (list(scenes.COLOURS), _leftmost_templates, lambda s: s[0][1]),
    "red_circle": (["yes", "no"],
                   lambda c: _single("red", "circle") if c == "yes" else
                   [t for col in scenes.COLOURS for sh in scenes.SHAPES if (col, sh) != ("red", "circle")
                    for t in _single(col, sh)],
                   lambda s: "yes" if ("circle", "red") in s else "no"),
}


def retrieval(image_embeds: np.ndarray, text_embeds: np.ndarray, same_content: np.ndarray | None = None) -> dict:
  """Recall@k both ways of N pairs (row i of each is a pair); with `same_content` [N, N]
  also the content recalls (module docstring). Keys: i2t_r@k, t2i_r@k (+ _content), chance@k."""
  n = image_embeds.shape[0]
  scores = np.asarray(image_embeds, np.float64) @ np.asarray(text_embeds, np.float64).T
  exact = np.eye(n, dtype=bool)
  out = {}
  for name, s in (("i2t", scores), ("t2i", scores.T)):
    for k, r in recall_at(s, exact).items():
      out[f"{name}_r@{k}"] = r
    if same_content is not None:
      for k, r in recall_at(s, same_content | exact).items():
        out[f"{name}_r@{k}_content"] = r
  for k in RECALL_AT:
    out[f"chance_r@{k}"] = min(k / n, 1.0)
  return out


def _pair_records(data_dir: str, config, tokenizer, image_size: int, limit: int):
  """(images uint8 [N, S, S, 3], ids [N, T], mask [N, T], scene contents or None) of the
  validation pairs of the mixture's datasets, in stored order; skipped records counted."""
  mixture = common.parse_mixture(str(config.data.get("mixture", "")) or pairs.DEFAULT_MIXTURE)
  names = list(mixture) if isinstance(mixture, dict) else ["captions"]
  builder = pairs.PairBuilder(tokenizer, int(config.data.text_length), image_size, truncate=True)
  images, ids, masks, contents, skipped = [], [], [], [], 0
  for name in names:
    try:
      source = data_lib.open_split(data_dir, name, "validation")
    except (KeyError, ValueError, OSError):
      continue
    for i in range(len(source)):
      if limit and len(images) >= limit:
        break
      rec = source[i]
      try:
        ex = builder.build(rec, str(i))
      except (data_lib.BadRecordError, BadImageError):
        skipped += 1
        continue
      images.append(ex["images"])
      ids.append(ex["input_ids"])
      masks.append(ex["text_mask"])
      keys = [k.decode() if isinstance(k, bytes) else str(k) for k in rec.get("scenes", [])]
      contents.append(parse_scene_key(keys[0]) if len(keys) == 1 else None)
  if skipped:
    _log.warning("evaluation skipped %d validation records that are not image-text pairs", skipped)
  if not images:
    raise ValueError(f"no image-text pairs in the validation splits of {names} in {data_dir!r}")
  return np.stack(images), np.stack(ids), np.stack(masks), contents, skipped


def embedding_fns(model, batch_size: int = 100):
  """((params, images) -> [N, E], (params, ids, mask) -> [N, E]): the towers jitted once, run
  in fixed-size batches (the last padded), so every call reuses one compilation."""
  image_fn = jax.jit(lambda p, x: model.module.apply({"params": p}, x, method="encode_image"))
  use_mask = model.config.text.pooling == "eos"
  text_fn = jax.jit(lambda p, i, m: model.module.apply({"params": p}, i, m if use_mask else None,
                                                      method="encode_text"))

  def batched(fn, params, *arrays):
    n, out = arrays[0].shape[0], []
    for start in range(0, n, batch_size):
      chunk = [a[start:start + batch_size] for a in arrays]
      pad = batch_size - chunk[0].shape[0] if n > batch_size else 0
      chunk = [np.concatenate([c, np.repeat(c[-1:], pad, 0)]) if pad else c for c in chunk]
      out.append(np.asarray(fn(params, *chunk))[:batch_size - pad])
    return np.concatenate(out)

  return functools.partial(batched, image_fn), functools.partial(batched, text_fn)


def embedder(model, params, batch_size: int = 100):
  """(images -> [N, E], (ids, mask) -> [N, E]) in fixed-size jitted batches (the last padded)."""
  embed_images, embed_texts = embedding_fns(model, batch_size)
  return functools.partial(embed_images, params), functools.partial(embed_texts, params)


def class_embeddings(embed_text, tokenizer, length: int, prompts: list[list[str]]) -> np.ndarray:
  """[C, E]: per class, the normalised mean of its prompts' normalised embeddings."""
  flat = [p for ps in prompts for p in ps]
  encoded = [pairs.encode_text(tokenizer, p, length, truncate=True)[:2] for p in flat]
  emb = embed_text(np.stack([e[0] for e in encoded]), np.stack([e[1] for e in encoded]))
  out, start = [], 0
  for ps in prompts:
    mean = emb[start:start + len(ps)].mean(axis=0)
    out.append(mean / max(np.linalg.norm(mean), 1e-12))
    start += len(ps)
  return np.stack(out)


def zero_shot(image_embeds: np.ndarray, contents: list, embed_text, tokenizer, length: int) -> dict:
  """{task: accuracy, task_chance, task_majority} over the images whose scene is known."""
  known = [i for i, c in enumerate(contents) if c is not None]
  if not known:
    return {}
  out = {}
  for task, (classes, prompts_of, label_of) in ZERO_SHOT_TASKS.items():
    cls = class_embeddings(embed_text, tokenizer, length, [prompts_of(c) for c in classes])
    pred = np.argmax(image_embeds[known] @ cls.T, axis=1)
    truth = np.array([classes.index(label_of(contents[i])) for i in known])
    out[f"zero_shot_{task}"] = float(np.mean(pred == truth))
    out[f"zero_shot_{task}_chance"] = 1.0 / len(classes)
    out[f"zero_shot_{task}_majority"] = float(np.max(np.bincount(truth, minlength=len(classes))) / len(truth))
  return out


def evaluate(model, params, tokenizer, data_dir: str, config) -> dict:
  """Retrieval and zero-shot figures of `params` on the validation pairs (flat dict of floats)."""
  limit = int(config.eval.get("num_pairs", 0))
  images, ids, masks, contents, skipped = _pair_records(data_dir, config, tokenizer, model.config.vision.image_size,
                                                        limit)
  if bool(config.data.get("blank_images", False)):
    images = np.zeros_like(images)
  embed_image, embed_text = embedder(model, params)
  image_embeds, text_embeds = embed_image(images), embed_text(ids, masks)
  same = None
  if all(c is not None for c in contents):
    ids_of = {c: i for i, c in enumerate(dict.fromkeys(contents))}
    keys = np.array([ids_of[c] for c in contents])
    same = keys[:, None] == keys[None, :]
  out = {"pairs": len(images), "pairs_skipped": skipped}
  out.update(retrieval(image_embeds, text_embeds, same))
  out.update(zero_shot(image_embeds, contents, embed_text, tokenizer, int(config.data.text_length)))
  return out
