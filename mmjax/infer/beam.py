"""Beam search over a family's :class:`~mmjax.infer.Decoding`, with transformers' scoring.

Dimension letters: B batch, K beams, V vocabulary, M max_new_tokens.

What a call does (``BeamSearch.search``), following transformers' beam search
(``GenerationMixin._beam_search`` of transformers 5, the vectorised form of its former
``BeamSearchScorer`` / ``BeamHypotheses``):

- Each example keeps K running beams, each with the sum of its tokens' log-probabilities
  (``log_softmax`` over the whole vocabulary, then the family's banned ids set to -inf,
  as transformers' token-suppressing logits processors do). Before the first token the K
  beams are copies of the prompt and only the first counts (the others score -1e9).
- At each step the 2K best of the K x V continuations are ranked. One ending in eos among
  the first K ranks becomes a *finished hypothesis*; the K best not ending in eos run on.
  At step M (``max_new_tokens``) the first K ranks all become finished hypotheses, eos or
  not (transformers' beams that reach ``max_length``).
- A finished hypothesis scores ``sum_logprobs / generated_length ** length_penalty``, where
  ``generated_length`` counts the new tokens *with* the eos (the prompt is not counted).
  length_penalty > 0 favours longer hypotheses, < 0 shorter ones, 0 is the plain sum.
  (Older transformers releases divided by the whole sequence's length, prompt included and
  eos not; with length_penalty 0, OpenFlamingo's setting, the length does not matter.)
- Each example keeps its K best finished hypotheses and the answer is the best of them.
  ``early_stopping`` (transformers' flag) says when an example stops taking hypotheses:
  False (the default) once it holds K and its best running beam, scored at the current
  length, is no better than the worst of them; True once it holds K; "never" as False but,
  when length_penalty > 0, scoring the running beam at length M. The search ends when
  every example has stopped, or at step M.

With ``num_beams=1`` this is greedy decoding, token for token.

Shapes and compilations: the prefill runs once per example (batch B), then the cache and the
family's context are repeated to B*K rows (row ``b * K + k`` is beam k of example b). Each
step gathers the cache rows of the beams the previous step chose (parents are always beams
of the same example, whose context rows are equal, so the context needs no gather), runs
the family's step and ranks the continuations, all in one jitted function: one compilation
per (B*K, cache-length bucket), counted in ``trace_counts`` as "beam_step" (the prefill as
"beam_prefill"). Prompt and cache-length buckets are chosen as ``Generator.generate`` does.

Which axis of a cache or context leaf is the batch axis is read off the family's own
prefill: its output shapes at batch 1 and 2 (``jax.eval_shape``, nothing runs) differ on
exactly that axis — the scanned decoder layout stacks its cache over blocks first, so there
the batch axis is the second. A leaf whose shape does not depend on the batch is shared by
all rows; one that changes in any other way is a ValueError naming it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.infer.generate import DEFAULT_BUCKETS, Decoding, GenerateOutput, prepare_prompts

# The score transformers gives the K - 1 beams that do not exist before the first token.
ABSENT_BEAM_SCORE = -1e9
EARLY_STOPPING = (False, True, "never")


@dataclasses.dataclass
class BeamOutput(GenerateOutput):
  """``tokens`` and ``lengths`` are the best hypothesis's, as greedy decoding's are."""
  # Float32[B]: the best hypothesis's sum of log-probabilities / length ** length_penalty.
  scores: np.ndarray
  # Each example's K finished hypotheses, best first (the first is the one above):
  # Int32[B, K, M] tokens (pad_id after), Int32[B, K] lengths, Float32[B, K] scores.
  finished_tokens: np.ndarray
  finished_lengths: np.ndarray
  finished_scores: np.ndarray


@dataclasses.dataclass(frozen=True)
class BatchAxes:
  """The batch axis of each leaf (in ``jax.tree.leaves`` order), None where a leaf has none."""
  cache: tuple[int | None, ...]
  context: tuple[int | None, ...]


def axes_from_shapes(at_1: Any, at_2: Any, what: str) -> tuple[int | None, ...]:
  """Each leaf's batch axis, from the shapes of one tree at batch 1 (``at_1``) and 2: the
  axis of size 1 that becomes 2 while nothing else changes; None for a leaf that does not
  change (the same for every row)."""
  def axis(path, one, two):
    if one.shape == two.shape:
      return None
    batch = [i for i, size in enumerate(one.shape) if size == 1 and one.shape[:i] + (2,) + one.shape[i + 1:] == two.shape]
    if not batch:
      raise ValueError(f"{what}{jax.tree_util.keystr(path)} has shape {one.shape} at batch 1 and {two.shape} at "
                       "batch 2; expected one batch axis (of size batch) to gather beams along, or none")
    return batch[0]
  return tuple(jax.tree.leaves(jax.tree_util.tree_map_with_path(axis, at_1, at_2), is_leaf=lambda x: x is None))


def take_rows(tree: Any, axes: tuple[int | None, ...], rows: jax.Array) -> Any:
  """``tree`` with rows ``rows`` Int[R] of each leaf's batch axis (leaves without one as they are)."""
  leaves, treedef = jax.tree.flatten(tree)
  if len(leaves) != len(axes):
    raise ValueError(f"a tree of {len(leaves)} leaves was given {len(axes)} batch axes")
  return treedef.unflatten([x if a is None else jnp.take(x, rows, axis=a) for x, a in zip(leaves, axes)])


def top_continuations(log_probs: jax.Array, running: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The 2K best continuations of each example from log_probs [B*K, V] and the running beams'
  scores [B, K]: (scores Float32[B, 2K] best first, beam Int32[B, 2K], token Int32[B, 2K])."""
  b, k = running.shape
  v = log_probs.shape[-1]
  total = log_probs.reshape(b, k, v) + running[:, :, None]
  scores, flat = jax.lax.top_k(total.reshape(b, k * v), 2 * k)
  return scores, (flat // v).astype(jnp.int32), (flat % v).astype(jnp.int32)


def check_beam_arguments(num_beams: Any, length_penalty: Any, early_stopping: Any) -> None:
  """ValueError naming a value beam search cannot take."""
  if isinstance(num_beams, bool) or not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
    raise ValueError(f"num_beams={num_beams!r}; expected an int >= 1")
  if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float, np.number)) \
      or not math.isfinite(length_penalty):
    raise ValueError(f"length_penalty={length_penalty!r}; expected a finite number")
  if not (isinstance(early_stopping, bool) or early_stopping == "never"):
    raise ValueError(f"early_stopping={early_stopping!r}; expected one of {EARLY_STOPPING}")


@dataclasses.dataclass(frozen=True)
class Finished:
  """Each example's K best finished hypotheses, best first; an empty slot scores -inf."""
  scores: np.ndarray   # Float32[B, K], length-penalised
  tokens: np.ndarray   # Int32[B, K, M], pad_id after each hypothesis
  lengths: np.ndarray  # Int32[B, K]

  @classmethod
  def empty(cls, batch: int, num_beams: int, max_new_tokens: int, pad_id: int) -> Finished:
    return cls(np.full((batch, num_beams), -np.inf, np.float32),
               np.full((batch, num_beams, max_new_tokens), pad_id, np.int32), np.zeros((batch, num_beams), np.int32))

  def merged(self, scores: np.ndarray, tokens: np.ndarray, length: int) -> Finished:
    """The K best of these and new hypotheses of one length: scores Float32[B, N] (-inf: not
    a hypothesis), tokens Int32[B, N, M]. On a tie the older hypothesis stays first."""
    k = self.scores.shape[1]
    all_scores = np.concatenate([self.scores, scores.astype(np.float32)], axis=1)
    keep = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    def pick(old, new):
      return np.take_along_axis(np.concatenate([old, new], axis=1),
                                keep.reshape(keep.shape + (1,) * (old.ndim - 2)), axis=1)
    return Finished(np.take_along_axis(all_scores, keep, axis=1), pick(self.tokens, tokens),
                    pick(self.lengths, np.full(scores.shape, length, np.int32)))


class BeamSearch:
  """Holds a family's jitted beam prefill and beam step (compiled once per bucket).

  ``trace_counts`` counts how often each was traced (= compiled) — a test reads it.
  """

  def __init__(
      self,
      decoding: Decoding,
      *,
      prompt_buckets: Sequence[int] = DEFAULT_BUCKETS,
      length_buckets: Sequence[int] = DEFAULT_BUCKETS,
  ):
    if not isinstance(decoding, Decoding):
      raise TypeError(f"BeamSearch takes a mmjax.infer.Decoding (a family's task gives one); got "
                      f"{type(decoding).__name__}")
    self.decoding = decoding
    self.prompt_buckets = tuple(sorted(prompt_buckets))
    self.length_buckets = tuple(sorted(length_buckets))
    self.trace_counts: collections.Counter[str] = collections.Counter()
    self._axes: dict[Any, BatchAxes] = {}
    self.prefill_step = jax.jit(self._prefill, static_argnames=("num_beams", "axes"))
    self.beam_step = jax.jit(self._step, static_argnames=("axes",), donate_argnames=("cache",))

  def _log_probs(self, logits: jax.Array) -> jax.Array:
    """Float32[R, V] log-probabilities from logits [R, V], the banned ids at -inf."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    v = log_probs.shape[-1]
    if v - len(set(self.decoding.banned_ids)) < 2:
      raise ValueError(f"a vocabulary of {v} tokens with banned ids {self.decoding.banned_ids} leaves fewer "
                       "than 2 tokens to choose from; beam search needs 2")
    if not self.decoding.banned_ids:
      return log_probs
    banned = jnp.isin(jnp.arange(v, dtype=jnp.int32), jnp.asarray(self.decoding.banned_ids, jnp.int32))
    return jnp.where(banned[None, :], -jnp.inf, log_probs)

  def _prefill(self, params, inputs, prompt_ids, prompt_lengths, cache, running, *, num_beams, axes):
    self.trace_counts["beam_prefill"] += 1  # runs only while tracing
    b, t = prompt_ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, cache, context = self.decoding.prefill(params, inputs, prompt_ids, positions, prompt_lengths, cache)
    last = logits[jnp.arange(b), (prompt_lengths - 1).astype(jnp.int32)]
    rows = jnp.repeat(jnp.arange(b, dtype=jnp.int32), num_beams)  # K copies of each example
    cache = take_rows(cache, axes.cache, rows)
    context = take_rows(context, axes.context, rows)
    return top_continuations(self._log_probs(last)[rows], running), cache, context

  def _step(self, params, parents, token, position, running, context, cache, *, axes):
    self.trace_counts["beam_step"] += 1  # runs only while tracing
    cache = take_rows(cache, axes.cache, parents)
    logits, cache = self.decoding.step(params, token[:, None], position[:, None], context, cache)
    return top_continuations(self._log_probs(logits[:, 0]), running), cache

  def batch_axes(self, params, inputs: Mapping[str, jax.Array], prompt_bucket: int, cache_len: int) -> BatchAxes:
    """The batch axes of the prefill's cache and context (module docstring), memoised."""
    leaves, treedef = jax.tree.flatten(inputs)
    key = (treedef, tuple((x.shape[1:], x.dtype) for x in leaves), prompt_bucket, cache_len)
    if key not in self._axes:
      def shapes(n):
        def run(params, inputs):
          ids = jnp.zeros((n, prompt_bucket), jnp.int32)
          positions = jnp.broadcast_to(jnp.arange(prompt_bucket, dtype=jnp.int32), (n, prompt_bucket))
          _, cache, context = self.decoding.prefill(params, inputs, ids, positions, jnp.ones((n,), jnp.int32),
                                                    self.decoding.init_cache(n, cache_len))
          return cache, context
        at_n = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n,) + x.shape[1:], x.dtype), inputs)
        return jax.eval_shape(run, params, at_n)
      (cache_1, context_1), (cache_2, context_2) = shapes(1), shapes(2)
      self._axes[key] = BatchAxes(cache=axes_from_shapes(cache_1, cache_2, "cache"),
                                  context=axes_from_shapes(context_1, context_2, "context"))
    return self._axes[key]

  def _prepare(self, inputs, prompt_ids, prompt_lengths, max_new_tokens: int, pad_id: int):
    """``Generator.generate``'s checks and buckets (``prepare_prompts``)."""
    return prepare_prompts(self.decoding, self.prompt_buckets, self.length_buckets, inputs, prompt_ids,
                           prompt_lengths, max_new_tokens, pad_id)

  def search(
      self,
      params: Any,
      inputs: Mapping[str, Any] | None,
      prompt_ids: Any,
      max_new_tokens: int,
      *,
      num_beams: int,
      length_penalty: float = 1.0,
      early_stopping: bool | str = False,
      prompt_lengths: Any = None,
      eos_token_id: int | None = None,
      pad_id: int = 0,
  ) -> BeamOutput:
    """The best hypothesis after each prompt (module docstring).

    Args:
      params, inputs, prompt_ids, max_new_tokens, prompt_lengths, eos_token_id, pad_id: as
        ``Generator.generate`` takes them.
      num_beams: K, the beams kept per example (OpenFlamingo's evaluation uses 3).
      length_penalty: a finished hypothesis scores sum_logprobs / generated_length **
        length_penalty, its generated length counting the eos.
      early_stopping: False, True or "never", as transformers' flag.

    Returns:
      the best hypothesis's tokens Int32[B, M] (pad_id after it), lengths Int32[B] (the eos
      counted) and scores Float32[B] (length-penalised); and all K finished hypotheses.
    """
    check_beam_arguments(num_beams, length_penalty, early_stopping)
    inputs, padded, lengths, cache_len = self._prepare(inputs, prompt_ids, prompt_lengths, max_new_tokens, pad_id)
    k, m, penalty = int(num_beams), int(max_new_tokens), float(length_penalty)
    b = len(lengths)
    params = nn.unbox(params)
    params = params if "params" in params else {"params": params}
    axes = self.batch_axes(params, inputs, padded.shape[1], cache_len)

    running = np.full((b, k), ABSENT_BEAM_SCORE, np.float32)  # the running beams' summed log-probs
    running[:, 0] = 0.0
    running_tokens = np.full((b, k, m), pad_id, np.int32)
    finished = Finished.empty(b, k, m, pad_id)
    stopped = np.zeros((b,), bool)  # takes no more hypotheses (early_stopping)
    first_k = np.arange(2 * k) < k

    candidates, cache, context = self.prefill_step(
        params, inputs, jnp.asarray(padded), jnp.asarray(lengths), self.decoding.init_cache(b, cache_len),
        jnp.asarray(running), num_beams=k, axes=axes)
    for step in range(m):
      scores, beam, token = (np.asarray(c) for c in candidates)  # [B, 2K] each, best first
      generated = step + 1
      ends = np.zeros_like(token, bool) if eos_token_id is None else token == eos_token_id
      sequences = np.take_along_axis(running_tokens, beam[:, :, None], axis=1)
      sequences[:, :, step] = token
      finishing = (ends | (generated == m)) & first_k[None, :] & ~stopped[:, None]
      finished = finished.merged(np.where(finishing, scores / generated ** penalty, -np.inf), sequences, generated)
      if generated == m:
        break

      # The K best continuations that do not end in eos (there are K: at most one eos per beam).
      runs_on = np.argsort(ends, axis=1, kind="stable")[:, :k]
      running = np.take_along_axis(scores, runs_on, axis=1)
      running_tokens = np.take_along_axis(sequences, runs_on[:, :, None], axis=1)
      parents = np.take_along_axis(beam, runs_on, axis=1) + k * np.arange(b, dtype=np.int32)[:, None]
      next_token = np.take_along_axis(token, runs_on, axis=1)

      # transformers' early stopping: the best running beam scored at the length it assumes.
      full = np.isfinite(finished.scores).all(axis=1)
      at = m if early_stopping == "never" and penalty > 0 else generated
      hopeless = running[:, 0] / at ** penalty <= finished.scores[:, -1]
      stopped |= full & (hopeless | (early_stopping is True))
      if stopped.all():
        break
      position = np.repeat(lengths, k) + step  # the token chosen at this step sits at prompt length + step
      candidates, cache = self.beam_step(
          params, jnp.asarray(parents.reshape(-1)), jnp.asarray(next_token.reshape(-1)), jnp.asarray(position),
          jnp.asarray(running), context, cache, axes=axes)
    return BeamOutput(tokens=finished.tokens[:, 0], lengths=finished.lengths[:, 0], scores=finished.scores[:, 0],
                      finished_tokens=finished.tokens, finished_lengths=finished.lengths,
                      finished_scores=finished.scores)


_SEARCHES: dict[int, BeamSearch] = {}


def beam_search(
    decoding: Decoding,
    params: Any,
    inputs: Mapping[str, Any] | None,
    prompt_ids: Any,
    max_new_tokens: int,
    *,
    num_beams: int,
    length_penalty: float = 1.0,
    **kwargs,
) -> BeamOutput:
  """``BeamSearch(decoding).search(...)`` with one BeamSearch (and its compilations) per
  Decoding object, as ``mmjax.infer.generate`` keeps one Generator.

  See ``BeamSearch.search`` for the other arguments (``early_stopping``,
  ``prompt_lengths``, ``eos_token_id``, ``pad_id``).
  """
  key = id(decoding)
  if key not in _SEARCHES or _SEARCHES[key].decoding is not decoding:
    _SEARCHES[key] = BeamSearch(decoding)
  return _SEARCHES[key].search(params, inputs, prompt_ids, max_new_tokens, num_beams=num_beams,
                               length_penalty=length_penalty, **kwargs)
