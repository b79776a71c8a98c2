"""flamingo/tiny_interleaved: flamingo/tiny trained with the embedded interleaved documents
too, so that it has seen several `<image>`-text chunks in one sequence, as few-shot
prompts are (issue 19's few-shot and RICES figures are measured on it).

Run:
  mmjax train --config configs/flamingo/tiny_interleaved.py --workdir work/flamingo-tiny-interleaved
  mmjax eval --workdir work/flamingo-tiny-interleaved --task vqa:embedded --shots 0,4 --seeds 3
  mmjax eval --workdir work/flamingo-tiny-interleaved --task vqa:embedded --shots 4 \
      --rices --rices-tower work/clip-tiny

Expected (seed 0, 900 steps, 10 min on 2 Xeon cores beside other jobs; 2026-12-03,
docs/evaluation_results.md): validation loss 0.315; on the 400 validation questions QA
accuracy 58.25% zero-shot, 45.25 +- 1.56% with 4 random examples (seeds 0-2), 46.75% with
4 chosen by RICES over clip/tiny's tower, about 30% at 8 shots (prompts longer than any
sequence it trained on); caption CIDEr-D 1.28 greedy, 3.62 with 3 beams.

Differences from flamingo/tiny: the mixture adds the interleaved documents (2-5 images
each, cut at a chunk boundary to fit), each example holds up to 2 images in 48 tokens, and
`mmjax eval --task` asks in the dataset's own words (`eval.prompts`), which the model was
trained on, instead of OpenFlamingo's "Short answer:" and "Output:".
"""

import importlib.util
import os

import ml_collections


def _tiny():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py")
  spec = importlib.util.spec_from_file_location("flamingo_tiny_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(arg=None):
  del arg
  c = _tiny()
  # Interleaved documents beside the questions and captions of flamingo/tiny.
  c.data.mixture = "qa:1.0,captions:2.0,interleaved:1.0"
  # Two image slots: a document whose text runs past 48 tokens keeps the chunks before the
  # cut, one with more than two images within 48 tokens is skipped (counted); enough to
  # learn that text after an image speaks of that image.
  c.data.num_images = 2
  c.data.text_length = 48
  # `mmjax eval --task`: how a task is asked, per task kind (mmjax.evaluation.prompts); the
  # embedded questions' own wording instead of OpenFlamingo's.
  c.eval.prompts = ml_collections.ConfigDict()
  c.eval.prompts.vqa = "<image>Question: {question} Answer: {answer}<|endofchunk|>"
  c.eval.prompts.captioning = "<image>{caption}<|endofchunk|>"
  return c
