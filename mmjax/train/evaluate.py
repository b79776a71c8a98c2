"""Evaluation of a trained work directory: validation loss and perplexity for every family;
for a family whose model reads images and generates text, exact-match QA accuracy (zero-shot
and few-shot) and CIDEr-D of generated captions on the embedded dataset's validation split;
and the family's own figures (`Task.evaluate`: a contrastive model's retrieval recall and
zero-shot accuracy).

Generation is `mmjax.infer`'s cached generator over the family's `Decoding` (greedy; the
prompts are batched and right-padded, so each batch shape compiles once).

Dimension letters: B batch, N images, S image side, T prompt length.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from mmjax import data as data_lib
from mmjax import families
from mmjax import filelock
from mmjax import infer
from mmjax.data.qa import accuracy_by_kind
from mmjax.train import cider as cider_lib
from mmjax.train import config as config_lib
from mmjax.train import loop
from mmjax.train import step as step_lib
from mmjax.train import workdir as workdir_lib

EVAL_FILE = "eval.json"


def prompt_ids(tokenizer: data_lib.Tokenizer, prompt: str) -> list[int]:
  """The prompt's ids as the model saw text in training: BOS first (the pipeline's sequences
  all start with one; without it the model is asked about a context it never saw)."""
  return tokenizer.encode_prompt(prompt)


@dataclasses.dataclass
class TextGenerator:
  """Greedy continuations of text prompts (with images, for a family that reads them)."""
  decoding: infer.Decoding
  params: Any
  tokenizer: data_lib.Tokenizer
  batch_size: int = 64

  def __post_init__(self):
    self._generator = infer.Generator(self.decoding)

  def generate(self, images: np.ndarray | None, prompts: list[str], max_new_tokens: int) -> list[str]:
    """images uint8 [B, N, S, S, 3] (each prompt has N `<image>`s) or None, prompts -> continuations
    (each cut after its first `<|endofchunk|>`)."""
    tok = self.tokenizer
    encoded = [prompt_ids(tok, p) for p in prompts]
    longest = max(len(e) for e in encoded)
    out = []
    for start in range(0, len(prompts), self.batch_size):
      chunk = encoded[start:start + self.batch_size]
      n = len(chunk)
      pad = self.batch_size - n if len(prompts) > self.batch_size else 0  # one shape for every batch
      ids = np.full((n + pad, longest), tok.pad_id, np.int32)
      lengths = np.zeros((n + pad,), np.int32)
      for i, e in enumerate(chunk + [chunk[-1]] * pad):
        ids[i, :len(e)] = e
        lengths[i] = len(e)
      inputs = None
      if images is not None:
        imgs = images[start:start + self.batch_size]
        imgs = np.concatenate([imgs, np.repeat(imgs[-1:], pad, axis=0)]) if pad else imgs
        inputs = {"images": imgs}
      result = self._generator.generate(self.params, inputs, ids, max_new_tokens, prompt_lengths=lengths,
                                        eos_token_id=tok.end_of_chunk_id, pad_id=tok.pad_id)
      for i in range(n):
        out.append(tok.decode([int(t) for t in result.tokens[i, :result.lengths[i]]]))
    return out


def _maybe_blank(config, images: np.ndarray) -> np.ndarray:
  return np.zeros_like(images) if bool(config.data.blank_images) else images


def qa_accuracy(config: ml_collections.ConfigDict, gen: TextGenerator, data_dir: str, *, shots: int, limit: int,
                max_new_tokens: int) -> tuple[float, list[dict]]:
  """Exact-match accuracy on the validation QA split with `shots` solved examples before each question.

  Shots come from the train split (different scenes), in stored order, each with its image.
  """
  d, size = data_dir, int(config.data.image_size)
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


def caption_cider(config: ml_collections.ConfigDict, gen: TextGenerator, data_dir: str, *, limit: int,
                  max_new_tokens: int = 24) -> float:
  """CIDEr-D of captions generated after `<image>` + `eval.caption_prompt` (validation captions split)."""
  d, size = data_dir, int(config.data.image_size)
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
  limit = int(config.eval.get("num_questions", 0)) if num_questions is None else num_questions
  k = int(config.eval.get("few_shot_k", 0)) if few_shot_k is None else few_shot_k
  eval_step = jax.jit(step_lib.make_eval_step(task.apply_fn, loss_fn=task.loss_fn))
  res = {"step": step, "family": families.of_config(config).name}
  if task.takes_images:
    res["blank_images"] = bool(config.data.blank_images)
  res["val_loss"] = loop.evaluate_loss(eval_step, params, task.val_data(), config, int(config.eval.num_batches))
  if task.loss_fn is None:  # a next-token loss: its exponential means something
    res["val_perplexity"] = math.exp(min(res["val_loss"], 700.0))
  if task.takes_images and task.decoding is not None:
    gen = TextGenerator(task.decoding, {"params": params}, task.tokenizer)
    max_new = int(config.eval.max_new_tokens)
    res["qa_zero_shot"], rows = qa_accuracy(config, gen, task.data_dir, shots=0, limit=limit, max_new_tokens=max_new)
    res["qa_zero_shot_by_kind"] = accuracy_by_kind(rows)
    res["examples"] = rows[:8]
    if k > 0:
      res[f"qa_{k}_shot"], _ = qa_accuracy(config, gen, task.data_dir, shots=k, limit=limit, max_new_tokens=max_new)
    if with_cider:
      res["cider"] = caption_cider(config, gen, task.data_dir, limit=min(limit or 100, 100))
  if task.evaluate is not None:
    res.update(task.evaluate(params))
  filelock.atomic_write(out_path, json.dumps(res, indent=2).encode())
  return res


def _check_writable(path: str) -> None:
  try:
    workdir_lib.ensure_writable(os.path.dirname(path))
  except OSError as e:
    reason = os.strerror(e.errno) if e.errno else e.strerror
    raise OSError(e.errno, f"cannot write the results to {path} ({reason}); nothing was evaluated. Make "
                  "the work directory writable, or copy it somewhere writable and evaluate the copy") from None
