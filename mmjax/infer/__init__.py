"""Inference: cached generation, sampling and beam search.

  from mmjax.infer import beam_search, generate, prompt
  images, ids = prompt.few_shot([(img1, "a cat"), (img2, "a dog")], img3, "a", config, tok.encode)
  decoding = mmjax.families.get("flamingo").decoding(config)   # what differs per family
  out = generate(decoding, params, {"images": images[None]}, ids[None], max_new_tokens=16,
                 sampling="top_p", rng=jax.random.key(0))
  out.tokens  # Int32[B, max_new_tokens]
  best = beam_search(decoding, params, {"images": images[None]}, ids[None], max_new_tokens=20,
                     num_beams=3, length_penalty=0.0)   # OpenFlamingo's caption setting
"""

from mmjax.infer import prompt
from mmjax.infer.beam import BeamOutput, BeamSearch, beam_search
from mmjax.infer.generate import Decoding, GenerateOutput, Generator, generate
from mmjax.infer.sampling import Sampling, sample, sample_with

__all__ = ["BeamOutput", "BeamSearch", "Decoding", "GenerateOutput", "Generator", "Sampling", "beam_search",
           "generate", "prompt", "sample", "sample_with"]
