"""Parity: open_flamingo's ``Flamingo`` over the LMs of the released OpenFlamingo models (a
tiny transformers ``MptForCausalLM``: OpenFlamingo-9B's MPT; a tiny ``GPTNeoXForCausalLM``:
OpenFlamingo-4B's RedPajama) with an open_clip-layout ViT whose patch tokens skip ln_post (open_clip
< 2.23), each wrapped under open_flamingo's own decoder-layer attribute (``transformer.blocks``,
``gpt_neox.layers``), gives our ``Flamingo``'s logits for an interleaved batch with several images:
converted from the whole state_dict, and loaded by ``load_open_flamingo`` from what a release
ships (a trainable-only ``checkpoint.pt``, the LM directory as published with a larger
vocabulary, the whole CLIP's weights). MosaicGPT (OpenFlamingo-3B's MPT-1B), whose code is not
importable here, is checked against its source's forward written out in torch (its q/k
LayerNorm over the whole width included) and by its key layout against MPT's.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mmjax.convert import hf_gpt_neox, hf_lm, hf_mpt, mosaic_gpt
from mmjax.families.flamingo import convert as flamingo_convert
from mmjax.families.flamingo import presets
from mmjax.families.flamingo.model import Flamingo, FlamingoConfig
from mmjax.models.perceiver import PerceiverConfig
from mmjax.models.vit import ViTConfig, VisionTransformer
from tests.parity.conftest import import_open_flamingo

pytestmark = pytest.mark.parity

VOCAB, LM_VOCAB, MEDIA, EOC = 64, 72, 61, 62  # the LM as published has 72 rows; Flamingo resizes to 64
IMAGE, PATCH, VIS = 28, 7, 32


class _QuickGELU(torch.nn.Module):
  def forward(self, x):
    return x * torch.sigmoid(1.702 * x)


class _ResBlock(torch.nn.Module):
  """open_clip's ResidualAttentionBlock (OpenAI weights: QuickGELU, no layer scale)."""

  def __init__(self, d, heads, mlp):
    super().__init__()
    self.ln_1 = torch.nn.LayerNorm(d)
    self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
    self.ln_2 = torch.nn.LayerNorm(d)
    self.mlp = torch.nn.Sequential()
    self.mlp.add_module("c_fc", torch.nn.Linear(d, mlp))
    self.mlp.add_module("gelu", _QuickGELU())
    self.mlp.add_module("c_proj", torch.nn.Linear(mlp, d))

  def forward(self, x):
    h = self.ln_1(x)
    x = x + self.attn(h, h, h, need_weights=False)[0]
    return x + self.mlp(self.ln_2(x))


class _OpenClipVisual(torch.nn.Module):
  """open_clip's VisionTransformer with output_tokens=True. ``ln_post_on_tokens`` False is
  open_clip < 2.23 (ln_post on the pooled CLS only), True is 2.23 and later (on every token)."""

  def __init__(self, ln_post_on_tokens=False, d=VIS, layers=2, heads=4, mlp=64, embed=24):
    super().__init__()
    grid = IMAGE // PATCH
    self.ln_post_on_tokens = ln_post_on_tokens
    self.conv1 = torch.nn.Conv2d(3, d, PATCH, PATCH, bias=False)
    self.class_embedding = torch.nn.Parameter(torch.randn(d) * d**-0.5)
    self.positional_embedding = torch.nn.Parameter(torch.randn(grid * grid + 1, d) * d**-0.5)
    self.ln_pre = torch.nn.LayerNorm(d)
    self.transformer = torch.nn.Module()
    self.transformer.resblocks = torch.nn.ModuleList([_ResBlock(d, heads, mlp) for _ in range(layers)])
    self.ln_post = torch.nn.LayerNorm(d)
    self.proj = torch.nn.Parameter(torch.randn(d, embed) * d**-0.5)

  def forward(self, x):
    x = self.conv1(x).flatten(2).permute(0, 2, 1)
    cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
    for block in self.transformer.resblocks:
      x = block(x)
    if self.ln_post_on_tokens:
      x = self.ln_post(x)
      pooled, tokens = x[:, 0], x[:, 1:]
    else:
      pooled, tokens = self.ln_post(x[:, 0]), x[:, 1:]
    return pooled @ self.proj, tokens


class _VisionEncoder(torch.nn.Module):  # what open_clip.create_model_and_transforms returns
  def __init__(self):
    super().__init__()
    self.visual = _OpenClipVisual()


VIT = ViTConfig(image_size=IMAGE, patch_size=PATCH, width=VIS, depth=2, num_heads=4, mlp_dim=64,
                activation="quick_gelu", post_norm_tokens=False)


def _lm(kind: str):
  """(LM as published, its layers attribute, DecoderConfig reader, cross_attn_every_n_layers)."""
  if kind == "mpt":  # OpenFlamingo-9B's MPT-7B, in transformers' MPT layout
    config = transformers.MptConfig(d_model=48, n_heads=4, n_layers=3, expansion_ratio=4, max_seq_len=64,
                                    vocab_size=LM_VOCAB, attn_config={"alibi": True, "alibi_bias_max": 8})
    return transformers.MptForCausalLM(config), "transformer.blocks", hf_mpt.config_from_hf_mpt, 1
  config = transformers.GPTNeoXConfig(  # OpenFlamingo-4B's RedPajama-INCITE-3B: sequential, untied
      hidden_size=48, num_attention_heads=4, num_hidden_layers=4, intermediate_size=96, vocab_size=LM_VOCAB,
      max_position_embeddings=64, use_parallel_residual=False, rotary_pct=0.5, tie_word_embeddings=False)
  return transformers.GPTNeoXForCausalLM(config), "gpt_neox.layers", hf_gpt_neox.config_from_hf_gpt_neox, 2


def _perturb_(module, names, scale):
  with torch.no_grad():
    for name, p in module.named_parameters():
      if any(n in name for n in names):
        p.add_(scale * torch.randn_like(p))


def _reference(kind: str, lm_dir):
  """An OpenFlamingo as open_flamingo's factory builds it (the LM saved to ``lm_dir`` first, as
  published), with gates opened, norms perturbed and the resized embeddings "trained"."""
  of = import_open_flamingo()
  torch.manual_seed(0)
  lm, layers, read_config, every = _lm(kind)
  _perturb_(lm, ("norm", "layernorm"), 0.2)  # LayerNorms start at identity: make their import show
  lm.save_pretrained(lm_dir)
  lm.resize_token_embeddings(VOCAB)  # tokenizer + <|endofchunk|>, <image>, <PAD>: keeps the first rows
  with torch.no_grad():  # training moves the new tokens' rows (the checkpoint keeps them)
    lm.get_input_embeddings().weight[-4:] += 0.5
  of.utils.extend_instance(lm, of.flamingo_lm.FlamingoLMMixin)
  lm.set_decoder_layers_attr_name(layers)
  model = of.flamingo.Flamingo(_VisionEncoder(), lm, eoc_token_id=EOC, media_token_id=MEDIA, vis_dim=VIS,
                               cross_attn_every_n_layers=every)
  _perturb_(model.vision_encoder, ("ln_",), 0.1)
  with torch.no_grad():  # gates start at 0; open them so the cross-attention counts
    for name, p in model.named_parameters():
      if name.endswith(("attn_gate", "ff_gate")):
        p.copy_(torch.tensor([0.5]) + 0.3 * torch.randn(1))
  model.eval()
  config = FlamingoConfig(
      vision=VIT, resampler=PerceiverConfig(width=VIS, depth=6, num_heads=8, head_dim=64, num_latents=64),
      decoder=read_config(lm.config, vocab_size=VOCAB), cross_attn_every_n_layers=every,
      media_token_id=MEDIA, end_of_chunk_token_id=EOC)
  return model, config, layers


@pytest.fixture(scope="module", params=["mpt", "gpt_neox"])
def reference(request, tmp_path_factory):
  lm_dir = tmp_path_factory.mktemp(f"lm_{request.param}")
  model, config, layers = _reference(request.param, lm_dir)
  return request.param, model, config, layers, lm_dir


def _batch():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(2, 3, IMAGE, IMAGE, 3)).astype(np.uint8)
  ids = rng.integers(1, MEDIA, size=(2, 14)).astype(np.int32)
  ids[0, [2, 6, 10]], ids[0, [5, 9]] = MEDIA, EOC  # text, 3 images each closing a chunk
  ids[1, [0, 7, 12]], ids[1, 11] = MEDIA, EOC      # the first image at position 0
  return images, ids


def _torch_logits(model, config, images, ids):
  mean = np.asarray(config.vision.image_mean, np.float32)
  std = np.asarray(config.vision.image_std, np.float32)
  pixels = (images.astype(np.float32) / 255.0 - mean) / std
  vision_x = torch.from_numpy(pixels.transpose(0, 1, 4, 2, 3)[:, :, None].copy())  # [B, N, F=1, C, H, W]
  with torch.no_grad():
    return model(vision_x, torch.from_numpy(ids).long(), attention_mask=torch.ones(ids.shape, dtype=torch.long)).logits.numpy()


def _max_diff(params, config, images, ids, want):
  got = np.asarray(Flamingo(config).apply({"params": params}, jnp.asarray(images), jnp.asarray(ids)))
  return float(np.max(np.abs(got - want))), got


def _architecture(kind):
  return {"mpt": "MptForCausalLM", "gpt_neox": "GPTNeoXForCausalLM"}[kind]


def test_flamingo_logits_equal_open_flamingo_over_mpt_and_gpt_neox_for_an_interleaved_batch(reference):
  kind, model, config, layers, _ = reference
  images, ids = _batch()
  want = _torch_logits(model, config, images, ids)
  sd = model.state_dict()
  assert any(k.startswith(f"lang_encoder.{layers}.0.decoder_layer.") for k in sd)
  params = flamingo_convert.flamingo_from_state_dict(sd, config, lm_architecture=_architecture(kind))
  diff, got = _max_diff(params, config, images, ids, want)
  print(f"{kind}: max |logits - open_flamingo| = {diff:.2e}")
  assert diff <= 1e-4, diff
  # The images matter: other images change the logits from each example's first <image> on.
  other, _ = _max_diff(params, config, 255 - images, ids, got)
  assert other > 1e-3


def test_a_released_style_checkpoint_loads_with_the_lm_directory_and_the_clip_weights(reference, tmp_path):
  """checkpoint.pt as open_flamingo's filter_state_dict_to_trainable leaves it: the perceiver,
  the cross-attention under its wrapped name only, the resized (trained) embeddings."""
  kind, model, config, layers, lm_dir = reference
  sd = model.state_dict()
  kept = {k: v for k, v in sd.items()
          if k.startswith("perceiver.") or ".gated_cross_attn_layer." in k
          or k in {f"lang_encoder.{name}" for name in flamingo_convert.lm_layout(_architecture(kind)).vocab_keys}}
  assert not any(k.startswith("lang_encoder.gated_cross_attn_layers.") for k in kept)
  torch.save(kept, tmp_path / "checkpoint.pt")
  clip = {f"visual.{k}": v for k, v in model.vision_encoder.state_dict().items()}
  clip["token_embedding.weight"] = torch.zeros(5, 4)  # the text tower's keys are not read
  torch.save(clip, tmp_path / "open_clip_pytorch_model.bin")
  preset = dataclasses.replace(config, decoder=dataclasses.replace(config.decoder, vocab_size=999))
  loaded_config, params = flamingo_convert.load_open_flamingo(
      tmp_path / "checkpoint.pt", lm_dir, tmp_path / "open_clip_pytorch_model.bin", preset)
  assert loaded_config.decoder.vocab_size == VOCAB  # the checkpoint's embedding rows, not the preset's
  assert dataclasses.replace(loaded_config, decoder=config.decoder) == config
  # The same params as the whole model's state_dict gives (whose logits the test above checks):
  # the LM directory's rows for the new tokens are not the trained ones the checkpoint holds.
  whole = flamingo_convert.flamingo_from_state_dict(sd, config, lm_architecture=_architecture(kind))
  jax.tree.map(np.testing.assert_array_equal, params, whole)
  untrained = flamingo_convert.flamingo_from_state_dict(
      {k: v for k, v in kept.items() if "embed" not in k and "wte" not in k and "lm_head" not in k}, config,
      vision_state_dict=clip_visual(model), lm_state_dict=hf_lm.open_state_dict(lm_dir),
      lm_architecture=_architecture(kind))
  assert not np.array_equal(untrained["decoder"]["embed"]["embedding"], whole["decoder"]["embed"]["embedding"])


def clip_visual(model):
  return {k: v for k, v in model.vision_encoder.state_dict().items()}


def test_the_tokens_differ_with_and_without_ln_post_and_the_presets_take_the_trained_ones():
  torch.manual_seed(3)
  visual = _OpenClipVisual().eval()
  _perturb_(visual, ("ln_",), 0.3)
  sd = {k: v for k, v in visual.state_dict().items()}
  pixels = np.random.default_rng(1).standard_normal((2, IMAGE, IMAGE, 3)).astype(np.float32)
  x = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    before_2_23 = visual(x)[1].numpy()
    visual.ln_post_on_tokens = True
    from_2_23 = visual(x)[1].numpy()
  tokens = {}
  for on_tokens in (False, True):
    config = dataclasses.replace(VIT, post_norm_tokens=on_tokens)
    params = flamingo_convert.hf_vision.clip_vision_from_state_dict(sd, config)
    tokens[on_tokens] = np.asarray(VisionTransformer(config).apply({"params": params}, jnp.asarray(pixels)))[:, 1:]
  assert np.abs(tokens[False] - before_2_23).max() <= 1e-5
  assert np.abs(tokens[True] - from_2_23).max() <= 1e-5
  assert np.abs(before_2_23 - from_2_23).max() > 0.1  # the choice matters
  for name in ("openflamingo-3b", "openflamingo-4b", "openflamingo-9b"):
    vision = presets.presets()[name].vision
    assert vision.post_norm and not vision.post_norm_tokens, name


# anas-awadalla/mpt-1b-redpajama-200b config.json (huggingface.co, revision 72e87cd), the fields read.
MPT_1B = {"architectures": ["MosaicGPT"], "alibi": True, "alibi_bias_max": 8, "attn_clip_qkv": None,
          "attn_qk_ln": True, "attn_uses_sequence_id": False, "d_model": 2048, "embedding_fraction": 1.0,
          "logit_scale": None, "low_precision_layernorm": True, "max_seq_len": 2048, "mlp_ratio": 4,
          "n_heads": 16, "n_layers": 24, "no_bias": True, "prefix_lm": False, "softmax_scale": None,
          "vocab_size": 50432}


def test_mpt_1b_config_reads_as_the_3b_presets_lm():
  assert mosaic_gpt.config_from_mosaic_gpt(MPT_1B, vocab_size=50280) == presets.presets()["openflamingo-3b"].decoder
  assert flamingo_convert.lm_layout("MosaicGPT").decoder_layers == "transformer.blocks"
  with pytest.raises(ValueError, match="n_heads=12"):
    mosaic_gpt.config_from_mosaic_gpt({**MPT_1B, "n_heads": 12})
  with pytest.raises(ValueError, match="prefix_lm"):
    mosaic_gpt.config_from_mosaic_gpt({**MPT_1B, "prefix_lm": True})


def _mosaic_gpt_logits(sd, ids, heads, bias_max=8.0):
  """MosaicGPT's forward as its source (module docstring of mmjax.convert.mosaic_gpt) computes
  it for attn_impl torch, no_bias, alibi, attn_qk_ln, written out with torch functionals."""
  f = torch.nn.functional
  x = sd["transformer.wte.weight"][ids]
  t, d = ids.shape[1], x.shape[-1]
  m = torch.arange(1, heads + 1, dtype=torch.float32) * (bias_max / heads)
  alibi = torch.arange(1 - t, 1, dtype=torch.float32).view(1, 1, 1, t) / (2**m.view(1, heads, 1, 1))
  causal = torch.ones(t, t, dtype=torch.bool).tril()
  n = 0
  while f"transformer.blocks.{n}.ln_1.weight" in sd:
    p = lambda name: sd[f"transformer.blocks.{n}.{name}"]  # noqa: E731
    a = f.layer_norm(x, (d,), p("ln_1.weight"))
    q, k, v = (a @ p("attn.Wqkv.weight").T).chunk(3, dim=2)
    q, k = f.layer_norm(q, (d,), p("attn.q_ln.weight")), f.layer_norm(k, (d,), p("attn.k_ln.weight"))
    q, k, v = (y.view(y.shape[0], t, heads, d // heads).transpose(1, 2) for y in (q, k, v))
    w = q @ k.transpose(-1, -2) / (d // heads) ** 0.5 + alibi
    w = w.masked_fill(~causal, torch.finfo(w.dtype).min).softmax(-1)
    x = x + ((w @ v).transpose(1, 2).reshape(x.shape) @ p("attn.out_proj.weight").T)
    h = f.gelu(f.layer_norm(x, (d,), p("ln_2.weight")) @ p("mlp.mlp_up.weight").T)
    x = x + h @ p("mlp.mlp_down.weight").T
    n += 1
  return f.layer_norm(x, (d,), sd["transformer.ln_f.weight"]) @ sd["transformer.wte.weight"].T


def test_mosaic_gpt_with_its_qk_layernorm_gives_the_logits_of_its_source():
  from mmjax.models.decoder import Decoder
  torch.manual_seed(5)
  d, heads, layers, vocab = 32, 4, 2, 50
  sd = {"transformer.wte.weight": torch.randn(vocab, d), "transformer.ln_f.weight": 1 + 0.2 * torch.randn(d)}
  for i in range(layers):
    p = f"transformer.blocks.{i}."
    sd.update({p + "ln_1.weight": 1 + 0.2 * torch.randn(d), p + "attn.Wqkv.weight": 0.2 * torch.randn(3 * d, d),
               p + "attn.q_ln.weight": 1 + 0.3 * torch.randn(d), p + "attn.k_ln.weight": 1 + 0.3 * torch.randn(d),
               p + "attn.out_proj.weight": 0.2 * torch.randn(d, d), p + "ln_2.weight": 1 + 0.2 * torch.randn(d),
               p + "mlp.mlp_up.weight": 0.2 * torch.randn(4 * d, d), p + "mlp.mlp_down.weight": 0.2 * torch.randn(d, 4 * d)})
  config = mosaic_gpt.config_from_mosaic_gpt({**MPT_1B, "d_model": d, "n_heads": heads, "n_layers": layers,
                                              "vocab_size": vocab, "max_seq_len": 32})
  assert config.qk_norm == "width" and not config.norm_bias
  ids = np.random.default_rng(0).integers(0, vocab, size=(2, 11))
  with torch.no_grad():
    want = _mosaic_gpt_logits(sd, torch.from_numpy(ids), heads).numpy()
  params = mosaic_gpt.mosaic_gpt_from_state_dict(sd, config)
  got, _ = Decoder(config).apply({"params": params}, jnp.asarray(ids, jnp.int32))
  diff = float(np.max(np.abs(np.asarray(got) - want)))
  print(f"MosaicGPT with attn_qk_ln: max |logits - source forward| = {diff:.2e}")
  assert diff <= 1e-4, diff
  # Without the q/k norms the logits are others: the importer does not drop them.
  plain = mosaic_gpt.config_from_mosaic_gpt({**MPT_1B, "attn_qk_ln": False, "d_model": d, "n_heads": heads,
                                             "n_layers": layers, "vocab_size": vocab, "max_seq_len": 32})
  with pytest.raises(ValueError, match=r"unexpected keys \(4\): transformer.blocks.0.attn.k_ln.weight"):
    mosaic_gpt.mosaic_gpt_from_state_dict(sd, plain)


_MOSAIC_NAMES = (("norm_1.", "ln_1."), ("norm_2.", "ln_2."), ("ffn.up_proj.", "mlp.mlp_up."),
                 ("ffn.down_proj.", "mlp.mlp_down."), ("transformer.norm_f.", "transformer.ln_f."))


def test_a_mosaic_gpt_state_dict_gives_the_params_of_the_mpt_it_renames():
  """MosaicGPT's GPTBlock computes what MPT's block does (module docstring of
  mmjax.convert.mosaic_gpt); only the names differ, so the same tensors must land in the same
  places."""
  torch.manual_seed(4)
  lm, _, _, _ = _lm("mpt")
  sd = {k: v.numpy() for k, v in lm.state_dict().items()}
  renamed = {}
  for key, value in sd.items():
    for old, new in _MOSAIC_NAMES:
      key = key.replace(old, new)
    renamed[key] = value
  config = hf_mpt.config_from_hf_mpt(lm.config)
  mosaic = mosaic_gpt.config_from_mosaic_gpt(dict(d_model=48, n_heads=4, n_layers=3, mlp_ratio=4, max_seq_len=64,
                                                  vocab_size=LM_VOCAB, alibi=True, no_bias=True))
  assert mosaic == config
  jax.tree.map(np.testing.assert_array_equal, mosaic_gpt.mosaic_gpt_from_state_dict(renamed, mosaic),
               hf_mpt.mpt_from_state_dict(sd, config))
