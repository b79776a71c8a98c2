"""CIDEr-D of raw captions, for the trainer's evaluator and the demo (`mmjax.evaluation.captions`).

Captions are tokenised by `mmjax.evaluation.captions.tokenize` (the rules of the PTB tokenizer
of the COCO caption evaluation) and scored by its `cider_d`, which equals pycocoevalcap's
CIDEr-D on the same tokens (tests/evaluation/test_captions.py). The CIDEr-D that lived here
computed the same numbers on the same tokens, but split words at every non-word character
("t-shirt", "doesn't"), where COCO's tokenizer does not.
"""

from __future__ import annotations

from collections.abc import Sequence

from mmjax.evaluation import captions

tokenize = captions.tokenize


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], *, max_n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
  """(corpus CIDEr-D, per-candidate scores); `references[i]` are the captions of item i."""
  return captions.cider_d([tokenize(c) for c in candidates], [[tokenize(r) for r in refs] for refs in references],
                          max_n=max_n, sigma=sigma)
