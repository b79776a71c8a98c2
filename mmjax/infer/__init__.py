"""Inference: cached generation and sampling.

  from mmjax.infer import generate, prompt
  images, ids = prompt.few_shot([(img1, "a cat"), (img2, "a dog")], img3, "a", config, tok.encode)
  decoding = mmjax.families.get("flamingo").decoding(config)   # what differs per family
  out = generate(decoding, params, {"images": images[None]}, ids[None], max_new_tokens=16,
                 sampling="top_p", rng=jax.random.key(0))
  out.tokens  # Int32[B, max_new_tokens]
"""

from mmjax.infer import prompt
from mmjax.infer.generate import Decoding, GenerateOutput, Generator, generate
from mmjax.infer.sampling import Sampling, sample, sample_with

__all__ = ["Decoding", "GenerateOutput", "Generator", "Sampling", "generate", "prompt", "sample", "sample_with"]
