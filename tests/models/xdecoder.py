"""A decoder with Flamingo's gated cross-attention inserted every n layers, as the Flamingo
family builds it (`families.flamingo.model.XAttnInsert`), for the decoder's own tests."""

from mmjax.families.flamingo.model import XAttnInsert
from mmjax.models.decoder import Decoder, init_decoder_cache
from mmjax.models.gated_xattn import GatedXAttnConfig
from mmjax.models.scan_layout import Insert

XATTN = GatedXAttnConfig(width=32, media_width=16, num_heads=2, head_dim=8, ff_mult=2)


def insert(n: int) -> Insert:
  return Insert("xattn", n, XAttnInsert, (XATTN,))


def decoder(config, n: int) -> Decoder:
  return Decoder(config, insert(n))


def side(image_index, media=None):
  return None if image_index is None else {"image_index": image_index, "media": media}


def apply(config, n, params, ids, image_index=None, media=None, media_kv=None, **kwargs):
  """(logits, cache) of the decoder with cross-attention every n layers."""
  return decoder(config, n).apply(params, ids, side=side(image_index, media), insert_state=media_kv, **kwargs)


def init_shapes(config, n, ids, image_index=None, media=None):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.eval_shape(decoder(config, n).init, jax.random.key(0), ids, side=side(image_index, media))


def media_kv(config, n, params, media):
  return decoder(config, n).apply(params, media, method=Decoder.prepare_inserts)


def cache(config, n, batch, length):
  return init_decoder_cache(config, batch, length, insert(n))
