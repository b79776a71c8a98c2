"""Evaluation of a trained work directory: validation loss, exact-match QA accuracy
(zero-shot and few-shot), and CIDEr-D of generated captions.

Generation here is greedy and recomputes the whole fixed-length buffer each token (no KV
cache): a few tokens per answer on tiny models, and one compile per buffer shape. The
cached generator of `mmjax.infer` is the one to use for long outputs.

Dimension letters: B batch, N images, S image side, T buffer length.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import data as data_lib
from mmjax.data import scenes
from mmjax.train import cider as cider_lib
from mmjax.train import config as config_lib
from mmjax.train import loop
from mmjax.train import step as step_lib
from mmjax import families
from mmjax import filelock
from mmjax.families.flamingo import task as task_lib
from mmjax.train import workdir as workdir_lib

EVAL_FILE = "eval.json"


@dataclasses.dataclass
class Generator:
  """Greedy continuation of prompts with images, on a fixed-shape token buffer."""
  apply_fn: step_lib.ApplyFn
  params: object
  tokenizer: data_lib.Tokenizer
  batch_size: int = 64

  def __post_init__(self):
    tok = self.tokenizer

    @jax.jit
    def next_token(params, images, ids, lengths):
      image_index = jnp.cumsum((ids == tok.image_id).astype(jnp.int32), axis=1)
      batch = {"images": images, "input_ids": ids, "image_index": image_index,
               "image_mask": jnp.ones(images.shape[:2], bool)}
      logits = self.apply_fn(params, batch, jax.random.key(0))  # [B, T, V]
      last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
      return jnp.argmax(last, axis=-1).astype(jnp.int32)

    self._next_token = next_token

  def encode(self, prompt: str) -> list[int]:
    """The prompt's ids as the model saw text in training: BOS first (the pipeline's sequences
    all start with one; without it the model is asked about a context it never saw)."""
    return self.tokenizer.encode_prompt(prompt)

  def generate(self, images: np.ndarray, prompts: list[str], max_new_tokens: int) -> list[str]:
    """images uint8 [B, N, S, S, 3] (each prompt has N `<image>`s), prompts -> continuations."""
    tok = self.tokenizer
    encoded = [self.encode(p) for p in prompts]
    longest = max(len(e) for e in encoded) + max_new_tokens
    t = -(-longest // 16) * 16  # round up: fewer distinct shapes, fewer compiles
    out = []
    for start in range(0, len(prompts), self.batch_size):
      chunk = encoded[start:start + self.batch_size]
      imgs = images[start:start + self.batch_size]
      n = len(chunk)
      pad = self.batch_size - n if len(prompts) > self.batch_size else 0
      ids = np.full((n + pad, t), tok.pad_id, np.int32)
      lengths = np.zeros((n + pad,), np.int32)
      for i, e in enumerate(chunk + [chunk[-1]] * pad):
        ids[i, :len(e)] = e
        lengths[i] = len(e)
      imgs = np.concatenate([imgs, np.repeat(imgs[-1:], pad, axis=0)]) if pad else imgs
      generated = [[] for _ in range(n)]
      for _ in range(max_new_tokens):
        nxt = np.asarray(self._next_token(self.params, imgs, ids, lengths))
        ids[np.arange(n + pad), lengths] = nxt
        lengths = lengths + 1
        for i in range(n):
          generated[i].append(int(nxt[i]))
      for g in generated:
        if tok.end_of_chunk_id in g:
          g = g[:g.index(tok.end_of_chunk_id) + 1]
        out.append(tok.decode(g))
    return out


def _maybe_blank(config, images: np.ndarray) -> np.ndarray:
  return np.zeros_like(images) if bool(config.data.blank_images) else images


def qa_accuracy(config: ml_collections.ConfigDict, gen: Generator, *, shots: int, limit: int,
                max_new_tokens: int) -> tuple[float, list[dict]]:
  """Exact-match accuracy on the validation QA split with `shots` solved examples before each question.

  Shots come from the train split (different scenes), in stored order, each with its image.
  """
  d, size = task_lib.data_dir(config), int(config.data.image_size)
  queries = list(data_lib.qa_records(d, "validation", image_size=size, limit=limit or None))
  pool = list(data_lib.qa_records(d, "train", image_size=size, limit=max(shots * 50, 1))) if shots else []
  prompts, images = [], []
  for i, q in enumerate(queries):
    chosen = [pool[(i * shots + j) % len(pool)] for j in range(shots)]
    prompts.append(data_lib.few_shot_prompt([(s["question"], s["answer"]) for s in chosen], q["question"]))
    images.append(np.concatenate([s["images"] for s in chosen] + [q["images"]], axis=0))
  outputs = gen.generate(_maybe_blank(config, np.stack(images)), prompts, max_new_tokens)
  rows = [{"question": q["question"], "answer": q["answer"], "prediction": data_lib.answer_from_generation(o),
           "correct": bool(data_lib.exact_match(o, q["answer"]))} for q, o in zip(queries, outputs)]
  return float(np.mean([r["correct"] for r in rows])) if rows else 0.0, rows


def caption_cider(config: ml_collections.ConfigDict, gen: Generator, *, limit: int,
                  max_new_tokens: int = 24) -> float:
  """CIDEr-D of captions generated after `<image>` + `eval.caption_prompt` (validation captions split)."""
  d, size = task_lib.data_dir(config), int(config.data.image_size)
  source = data_lib.open_split(d, "captions", "validation")
  count = min(limit or len(source), len(source))
  refs, images = [], []
  for i in range(count):
    rec = source[i]
    text = rec["text"].decode() if isinstance(rec["text"], bytes) else str(rec["text"])
    refs.append([text.replace(data_lib.IMAGE_TOKEN, "").replace(data_lib.END_OF_CHUNK_TOKEN, "").strip()])
    from mmjax.data.preprocess import decode_image
    images.append(np.stack([decode_image(bytes(b), size) for b in rec["images"]])[:1])
  # After a bare `<image>` a model trained on a mixture may start a question instead of a
  # caption; a caption opening (config.eval.caption_prompt) says which text is wanted.
  lead = str(config.eval.caption_prompt)
  outputs = gen.generate(_maybe_blank(config, np.stack(images)), [data_lib.IMAGE_TOKEN + lead] * count,
                         max_new_tokens)
  cands = [(lead + o.split(data_lib.END_OF_CHUNK_TOKEN)[0]).strip() for o in outputs]
  return cider_lib.cider_d(cands, refs)[0]


def load(workdir: str):
  """(config, task, step, params) of the newest complete checkpoint of a work directory."""
  config = config_lib.read_resolved(workdir)
  task = families.of_config(config).task(config, workdir)
  step, params = loop.restore_params(config, workdir, task)
  return config, task, step, params


def accuracy_by_kind(rows: list[dict]) -> dict[str, float]:
  """Exact match per kind of question (`scenes.question_kind`; 'other' for unknown wordings)."""
  hits = collections.defaultdict(list)
  for row in rows:
    hits[scenes.question_kind(row["question"]) or "other"].append(bool(row["correct"]))
  return {kind: float(np.mean(h)) for kind, h in sorted(hits.items())}


def evaluate(workdir: str, *, num_questions: int | None = None, few_shot_k: int | None = None,
             with_cider: bool = True, loaded=None) -> dict:
  """All metrics of a work directory; also written to `WORKDIR/eval.json`.

  Reads the work directory and writes only `eval.json` (whole or not at all); whether it
  can be written is checked first, before any time is spent evaluating.
  """
  if not os.path.isdir(workdir):
    raise ValueError(f"work directory {workdir!r} does not exist; expected one written by `mmjax train`")
  out_path = os.path.join(workdir, EVAL_FILE)
  _check_writable(out_path)
  config, task, step, params = loaded or load(workdir)
  limit = int(config.eval.num_questions) if num_questions is None else num_questions
  k = int(config.eval.few_shot_k) if few_shot_k is None else few_shot_k
  tok = task_lib.load_tokenizer(config, workdir)
  gen = Generator(task.apply_fn, params, tok)
  eval_step = jax.jit(step_lib.make_eval_step(task.apply_fn))
  res = {"step": step, "blank_images": bool(config.data.blank_images)}
  res["val_loss"] = loop.evaluate_loss(eval_step, params, task.val_data(), config, int(config.eval.num_batches))
  max_new = int(config.eval.max_new_tokens)
  res["qa_zero_shot"], rows = qa_accuracy(config, gen, shots=0, limit=limit, max_new_tokens=max_new)
  res["qa_zero_shot_by_kind"] = accuracy_by_kind(rows)
  res["examples"] = rows[:8]
  if k > 0:
    res[f"qa_{k}_shot"], _ = qa_accuracy(config, gen, shots=k, limit=limit, max_new_tokens=max_new)
  if with_cider:
    res["cider"] = caption_cider(config, gen, limit=min(limit or 100, 100))
  filelock.atomic_write(out_path, json.dumps(res, indent=2).encode())
  return res


def _check_writable(path: str) -> None:
  try:
    workdir_lib.ensure_writable(os.path.dirname(path))
  except OSError as e:
    reason = os.strerror(e.errno) if e.errno else e.strerror
    raise OSError(e.errno, f"cannot write the results to {path} ({reason}); nothing was evaluated. Make "
                  "the work directory writable, or copy it somewhere writable and evaluate the copy") from None
