"""open_flamingo's `Flamingo` (PyTorch) at an experiment config's sizes and recipe: the arm
`mmjax bench step --compare open_flamingo` times beside mmjax's own train step.

The model is open_flamingo's, built as its `factory.create_model_and_transforms` builds it,
over a CLIP vision tower (`transformers.CLIPVisionModel`, open_clip's `visual(x)` contract:
pooled, patch tokens after ln_post) and a `LlamaForCausalLM`, both of the config's sizes.
open_flamingo fixes what the config leaves free (its resampler: depth 6, 8 heads of 64, 64
latents, ff x4; its cross-attention: 8 heads of 64, ff x4; the resampler's width is the
vision tower's): where the config differs, the arm lists the difference
(`OpenFlamingoArm.differences`) instead of building another model. Recipe: float32, AdamW
(`torch.optim.AdamW`) with the config's lr, betas, eps and weight decay, gradient clipping at
`optimizer.clip_norm`, the same host batches, the loss the mmjax step takes (mean token
cross-entropy over `loss_mask`); what the first freeze stage trains gets `requires_grad`,
the rest is frozen. open_flamingo runs its vision tower under `torch.no_grad`, so a stage
that trains `vision` is refused. (open_flamingo itself also trains the LM's input
embeddings; mmjax has no component for them alone, so they follow `lm`.)

torch, transformers and open_flamingo are imported only here, when the arm is built: the
`parity` extra (`pip install -e '.[parity]' && pip install --no-deps open-flamingo==2.0.1`).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import time
import types

import ml_collections
import numpy as np

from mmjax.families.flamingo import model as flamingo
from mmjax.families.flamingo import task as task_lib

PARITY_INSTALL = "pip install -e '.[parity]' && pip install --no-deps open-flamingo==2.0.1"
# What open_flamingo's Flamingo builds whatever it is given (helpers.PerceiverResampler and
# helpers.GatedCrossAttentionBlock defaults).
FIXED_RESAMPLER = dict(depth=6, num_heads=8, head_dim=64, num_latents=64, ff_mult=4, max_num_media=None)
FIXED_XATTN = dict(xattn_num_heads=8, xattn_head_dim=64, xattn_ff_mult=4, only_attend_immediate_media=True)
_HF_ACTIVATION = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}


def install_open_clip_stub() -> None:
  """A stub `open_clip` in sys.modules (unless one is imported): `open_flamingo/__init__.py`
  imports it, which needs torchvision; the model modules (the benchmark's, the parity
  tests') never call it."""
  if "open_clip" in sys.modules:
    return
  stub = types.ModuleType("open_clip")
  stub.__doc__ = "Stub installed by mmjax: open_flamingo's model modules do not use open_clip."

  def _unavailable(*args, **kwargs):
    raise RuntimeError("open_clip is stubbed out by mmjax; build the vision tower locally")

  stub.create_model_and_transforms = _unavailable
  stub.get_tokenizer = _unavailable
  sys.modules["open_clip"] = stub


def _import_parity():
  """torch, transformers and open_flamingo's model modules, or an ImportError naming the install."""
  try:
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
    install_open_clip_stub()
    modules = types.SimpleNamespace(flamingo=importlib.import_module("open_flamingo.src.flamingo"),
                                    flamingo_lm=importlib.import_module("open_flamingo.src.flamingo_lm"),
                                    utils=importlib.import_module("open_flamingo.src.utils"))
  except ImportError as e:
    raise ImportError(f"--compare open_flamingo needs the parity extra ({e.name or e} is not installed): "
                      f"{PARITY_INSTALL}") from e
  return torch, transformers, modules


def differences(cfg: flamingo.FlamingoConfig) -> list[str]:
  """Where `cfg` is not the model open_flamingo builds at its sizes (empty: the same model)."""
  out = []
  for field, want in FIXED_RESAMPLER.items():
    if getattr(cfg.resampler, field) != want:
      out.append(f"resampler.{field}={getattr(cfg.resampler, field)} (open_flamingo: {want})")
  for field, want in FIXED_XATTN.items():
    if getattr(cfg, field) != want:
      out.append(f"{field}={getattr(cfg, field)} (open_flamingo: {want})")
  if cfg.resampler.width != cfg.vision.width:
    out.append(f"resampler.width={cfg.resampler.width} (open_flamingo: the vision width, {cfg.vision.width})")
  v = cfg.vision
  if v.stem != "patch" or not v.class_token or v.activation not in _HF_ACTIVATION:
    out.append(f"vision stem={v.stem!r}, class_token={v.class_token}, activation={v.activation!r} "
               "(the CLIP tower: 'patch', True, a GELU)")
  d = cfg.decoder
  if d.norm != "rms" or d.mlp != "swiglu" or d.positions != "rope" or d.attention_bias:
    out.append(f"decoder norm={d.norm!r}, mlp={d.mlp!r}, positions={d.positions!r}, "
               f"attention_bias={d.attention_bias} (LLaMA: 'rms', 'swiglu', 'rope', False)")
  return out


def _visual_class(transformers):
  class Visual(transformers.CLIPVisionModel):
    """open_clip's ``visual(x)`` contract: (pooled, patch tokens after ln_post, CLS dropped)."""

    def forward(self, pixel_values):  # pylint: disable=arguments-differ
      hidden = self.post_layernorm(super().forward(pixel_values=pixel_values).last_hidden_state)
      return hidden[:, 0], hidden[:, 1:]

  return Visual


def build_model(cfg: flamingo.FlamingoConfig, gate_value: float = 0.0):
  """open_flamingo's `Flamingo` at `cfg`'s tower sizes (the rest: open_flamingo's own), float32."""
  torch, transformers, of = _import_parity()
  v, d = cfg.vision, cfg.decoder
  clip_config = transformers.CLIPVisionConfig(
      hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
      image_size=v.image_size, patch_size=v.patch_size, layer_norm_eps=v.norm_eps,
      hidden_act=_HF_ACTIVATION.get(v.activation, "quick_gelu"))
  lm_config = transformers.LlamaConfig(
      vocab_size=d.vocab_size, hidden_size=d.width, intermediate_size=d.mlp_dim, num_hidden_layers=d.depth,
      num_attention_heads=d.num_heads, num_key_value_heads=d.num_kv_heads, head_dim=d.head_dim,
      max_position_embeddings=d.max_length, rms_norm_eps=d.norm_eps, tie_word_embeddings=d.tie_embeddings,
      rope_parameters={"rope_type": "default", "rope_theta": d.rope_theta})
  torch.manual_seed(0)
  encoder = torch.nn.Module()
  encoder.visual = _visual_class(transformers)(clip_config)
  lm = transformers.LlamaForCausalLM(lm_config)
  of.utils.extend_instance(lm, of.flamingo_lm.FlamingoLMMixin)  # what open_flamingo's factory does
  lm.set_decoder_layers_attr_name("model.layers")
  model = of.flamingo.Flamingo(encoder, lm, eoc_token_id=cfg.end_of_chunk_token_id,
                               media_token_id=cfg.media_token_id, vis_dim=v.width,
                               cross_attn_every_n_layers=cfg.cross_attn_every_n_layers)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith(("attn_gate", "ff_gate")):
        p.fill_(gate_value)
  return model.float()


def set_trainable(model, trainable: frozenset[str]) -> None:
  """requires_grad on what `trainable` (mmjax components) names, the rest frozen."""
  if "vision" in trainable:
    raise ValueError(f"the first freeze stage trains {sorted(trainable)}, with 'vision'; open_flamingo runs its "
                     "vision tower under torch.no_grad, so it cannot train it: compare a stage without 'vision' "
                     "(--config.freeze.stages=0:resampler,xattn[,lm])")
  model.requires_grad_(False)
  model.perceiver.requires_grad_("resampler" in trainable)
  model.lang_encoder.requires_grad_("lm" in trainable)
  model.lang_encoder.gated_cross_attn_layers.requires_grad_("xattn" in trainable)


@dataclasses.dataclass
class OpenFlamingoArm:
  """open_flamingo's train step over torch copies of mmjax's host batches, timed in rounds."""
  name: str
  step: object  # (batch) -> None: one update
  batches: list  # torch tensors, rounds x steps of them, timed in order
  warm_batch: dict
  differences: list[str]
  trainable_parameters: int
  torch_version: str
  # torch's intra-op threads (its default: one per core). On a shared machine, threads that
  # wait on a busy core cost far more than in XLA: time with the load average in view.
  torch_threads: int
  compile_s: float = 0.0  # torch compiles nothing: the first (untimed) step, as mmjax's
  flops: float | None = None  # torch.utils.flop_counter's count of one step
  seconds: list[float] = dataclasses.field(default_factory=list)

  def warm_up(self) -> None:
    """The first step (its time is `compile_s`), then one under torch's FLOP counter."""
    began = time.perf_counter()
    self.step(self.warm_batch)
    self.compile_s = time.perf_counter() - began
    try:
      from torch.utils import flop_counter
      with flop_counter.FlopCounterMode(display=False) as counter:
        self.step(self.warm_batch)
      self.flops = float(counter.get_total_flops())
    except (ImportError, RuntimeError, NotImplementedError):
      self.flops = None

  def time_round(self, steps: int) -> None:
    start = len(self.seconds) * steps
    began = time.perf_counter()
    for batch in self.batches[start:start + steps]:
      self.step(batch)
    self.seconds.append(time.perf_counter() - began)


def open_flamingo_arm(config: ml_collections.ConfigDict, task, host_batches: list[dict],
                      trainable: frozenset[str]) -> OpenFlamingoArm:
  """The `Family.originals` entry: open_flamingo's step at `config`'s sizes over `host_batches`
  (the batches mmjax's arm times, in the same order), training `trainable`."""
  torch, _, _ = _import_parity()
  cfg = task_lib.model_config(config, task.tokenizer)
  model = build_model(cfg, float(config.init.get("gate_value", 0.0)) if "init" in config else 0.0)
  set_trainable(model, trainable)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  o = config.optimizer
  optimizer = torch.optim.AdamW(params, lr=float(o.lr), betas=(float(o.b1), float(o.b2)), eps=float(o.eps),
                                weight_decay=float(o.weight_decay))
  clip_norm = float(o.get("clip_norm", 0.0))
  mean = torch.tensor(cfg.vision.image_mean, dtype=torch.float32).view(1, 1, 1, 3, 1, 1)
  std = torch.tensor(cfg.vision.image_std, dtype=torch.float32).view(1, 1, 1, 3, 1, 1)

  def to_torch(batch: dict) -> dict:
    images = np.asarray(batch["images"])  # [B, N, H, W, 3] uint8
    return {"images": torch.from_numpy(np.ascontiguousarray(images.transpose(0, 1, 4, 2, 3)[:, :, None])),
            "input_ids": torch.from_numpy(np.asarray(batch["input_ids"], np.int64)),
            "targets": torch.from_numpy(np.asarray(batch["targets"], np.int64)),
            "loss_mask": torch.from_numpy(np.asarray(batch["loss_mask"], np.float32))}

  def step(batch: dict) -> None:
    # The pixels are normalised inside the step, as mmjax's step takes uint8 images.
    vision_x = (batch["images"].float() / 255.0 - mean) / std  # [B, N, 1, 3, H, W]
    ids = batch["input_ids"]
    logits = model(vision_x, ids, attention_mask=torch.ones_like(ids)).logits
    losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), reduction="none")
    mask = batch["loss_mask"].flatten()
    loss = (losses * mask).sum() / mask.sum().clamp(min=1.0)
    loss.backward()
    if clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(params, clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  batches = [to_torch(b) for b in host_batches]
  return OpenFlamingoArm(name="open_flamingo", step=step, batches=batches, warm_batch=batches[0],
                         differences=differences(cfg), trainable_parameters=sum(p.numel() for p in params),
                         torch_version=torch.__version__, torch_threads=torch.get_num_threads())
