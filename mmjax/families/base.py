"""What a model family provides: the interface every multimodal design plugs into.

A *family* is the glue that turns the shared building blocks (layers, kernels, towers,
resampler, decoder) into something the trainer trains, the evaluator evaluates and `mmjax
compile` compiles: its model config and named presets, its component labels, and a `Task`
built from an experiment config. The trainer, evaluator, generator CLI, `mmjax compile`
and the zoo look a family up once (`mmjax.families.get(config.model.family)`) and never
name one. Families register in `mmjax.families.REGISTRY`, one line each.

FLOPs (`Task.flops_per_example`) follow MaxText's convention: sum every matmul (2·m·n·k)
and attention (4·B·S²·H·K, halved when causal); a trainable module counts x3, a frozen
module that gradients pass through x2, one they do not pass through x1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import ml_collections

# (params, batch, rng) -> logits float [B, T, V]
ApplyFn = Callable[[Any, dict, jax.Array], jax.Array]
# (params, batch, rng) -> (sum of the loss over the counted units, their count,
#   {name: sum over the same units}); the trainer reports loss = sum / count and each named
#   metric likewise, across devices and micro-batches.
LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass
class Task:
  """What is trained on what: the trainer's only view of a model and its data."""
  # (rng key) -> params
  init_params: Callable[[jax.Array], Any]
  # (params, batch, rng) -> logits [B, T, V] (generation and the default loss use it)
  apply_fn: ApplyFn
  # params -> pytree of component labels (`Family.components`)
  param_labels: Callable[[Any], Any]
  # () -> iterator of numpy batches with get_state()/set_state()
  train_data: Callable[[], Iterator[dict]]
  # () -> finite iterable of validation batches, or None
  val_data: Callable[[], Iterable[dict]] | None = None
  # trainable components -> matmul FLOPs of one example's train step, or None (no MFU)
  flops_per_example: Callable[[frozenset], float] | None = None
  # (rng key) -> the abstract parameters with their logical-axis boxes
  # (`jax.eval_shape(module.init, ...)['params']`), which the sharding rules read; None:
  # every parameter is replicated (a model with no logical annotations).
  boxed_params: Callable[[jax.Array], Any] | None = None
  # () -> {file name: bytes} the run depends on (the tokenizer): copied into the work
  # directory at the first start, compared at every resume (`workdir.record_files`).
  workdir_files: Callable[[], dict[str, bytes]] | None = None
  # The training loss; None: the next-token negative log-likelihood of `apply_fn`'s logits
  # over the batch's `loss_mask` (`mmjax.train.step.next_token_loss`).
  loss_fn: LossFn | None = None
  # The component labels `freeze.stages` may name (the family's, whether or not this
  # config's model has parameters of each); None: the labels `param_labels` gives.
  components: tuple[str, ...] | None = None
  # The tokenizer the task trains with (the evaluator and `mmjax generate` encode with it).
  tokenizer: Any = None
  # The data directory the task reads (the evaluator reads its validation records).
  data_dir: str | None = None
  # What cached generation needs of this model (`mmjax.infer.Decoding`), or None (a model
  # that does not generate text).
  decoding: Any = None
  # Whether the model reads images (then `decoding` takes {"images", "image_mask"} inputs,
  # and the evaluator asks it the dataset's questions about images).
  takes_images: bool = False
  # params -> {name: scalar} logged with every step's metrics (Flamingo: the tanh of each
  # cross-attention gate, `gate/...`, which `mmjax plot` draws); None: nothing.
  param_metrics: Callable[[Any], dict[str, jax.Array]] | None = None
  # (fresh params, the other run's family name, its params) -> params with the other
  # run's parameters in place (`config.init.from_workdir`: Flamingo takes an `lm` run's
  # as its decoder and a `contrastive` run's image tower as its vision tower); None: the
  # family takes none. Raises ValueError naming what does not fit.
  adopt_params: Callable[[Any, str, Any], Any] | None = None
  # params -> {name: number}: the family's own figures of a trained model, which `mmjax
  # eval` adds to the validation loss (the contrastive family: retrieval recall and
  # zero-shot accuracy next to chance); None: nothing beyond the generic ones.
  evaluate: Callable[[Any], dict[str, Any]] | None = None
  # (prompt text with `<image>` placeholders, images uint8 [H, W, 3] each at its own size) ->
  # (the generation inputs with a batch axis, prompt ids Int[T], the id that ends an answer):
  # a family that renders its own prompts (LLaVA: its chat template, each `<image>` expanded
  # to its image's tokens); None: `mmjax generate` encodes the prompt as training text starts
  # (BOS first), the images resized to `data.image_size`, and stops at `<|endofchunk|>`.
  render_prompt: Callable[[str, list], tuple[dict, Any, int]] | None = None
  # (params, images uint8 [N, S, S, 3] at `data.image_size`) -> Float[N, E], and (params,
  # texts) -> Float[N, E] in the same space: what `mmjax eval --task` scores retrieval and
  # zero-shot classification with (cosine similarity); None: the model embeds neither.
  embed_images: Callable[[Any, Any], Any] | None = None
  embed_texts: Callable[[Any, list[str]], Any] | None = None


@dataclasses.dataclass(frozen=True)
class AbstractModel:
  """A family's model for an experiment config without data or tokenizer (`mmjax compile`):
  every shape is known, nothing is allocated."""
  # The family's model config (its `config_class`).
  config: Any
  # As in Task.
  init_params: Callable[[jax.Array], Any]
  apply_fn: ApplyFn
  boxed_params: Callable[[jax.Array], Any]
  param_labels: Callable[[Any], Any]
  # (batch size, sequence length, images per example) -> {name: jax.ShapeDtypeStruct}
  # of one training batch
  abstract_batch: Callable[[int, int, int], dict]
  loss_fn: LossFn | None = None
  # (trainable components, batch size, sequence length, images per example, chips) ->
  # FLOPs per chip that XLA's cost analysis misses (a scanned decoder's loop body is
  # counted once); None: nothing is missed.
  uncounted_flops: Callable[[frozenset, int, int, int, int], float] | None = None
  # As in Task.
  param_metrics: Callable[[Any], dict[str, jax.Array]] | None = None


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family: see the module docstring. Every field is required of every family."""
  # The registry key and `config.model.family` value.
  name: str
  # The labels `param_labels` gives parameters: what `freeze.stages`, per-component
  # learning rates and sharding name.
  components: tuple[str, ...]
  # The model config dataclass.
  config_class: type
  # () -> {preset name: model config} at published sizes (`mmjax.zoo` lists them).
  presets: Callable[[], Mapping[str, Any]]
  # (experiment config, work directory or None) -> the trainer's Task. With a work
  # directory, the task uses what that directory trains with (its tokenizer copy).
  task: Callable[[ml_collections.ConfigDict, str | None], Task]
  # (experiment config) -> the model without data or tokenizer (`mmjax compile`).
  abstract: Callable[[ml_collections.ConfigDict], AbstractModel]
  # (preset config, **overrides) -> config (`mmjax.zoo.get(name, **overrides)`); None:
  # `dataclasses.replace`.
  override: Callable[..., Any] | None = None
  # (a `config.model` dict as an older mmjax recorded it) -> today's layout; None: layouts
  # never changed. Applied to a work directory's config.json when it is read.
  upgrade_model: Callable[[dict], dict] | None = None
  # (model config) -> `mmjax.infer.Decoding` for cached generation; None: none.
  decoding: Callable[[Any], Any] | None = None
  # {source name: (state_dict, model config) -> params}: imports of published weights.
  importers: Mapping[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)
  # {name: (experiment config, its Task, host batches, trainable components) -> a timed arm of the PyTorch original
  # at the config's sizes and recipe}: what `mmjax bench step --compare NAME` runs beside
  # mmjax's step (the arm's interface: `mmjax.bench_step`'s module docstring); empty: none.
  originals: Mapping[str, Callable[..., Any]] = dataclasses.field(default_factory=dict)

  def check_preset(self, name: str) -> None:
    """Raises ValueError if `name` is not one of this family's presets."""
    presets = list(self.presets())
    if name not in presets:
      raise ValueError(f"preset {name!r} is not one of the presets of family {self.name!r}; expected one of {presets}")

  def check_components(self, names: Iterable[str], where: str) -> None:
    """Raises ValueError if `names` holds a label this family's parameters do not have."""
    unknown = sorted(set(names) - set(self.components))
    if unknown:
      raise ValueError(f"{where} names {unknown}, which family {self.name!r} does not have; expected "
                       f"components from {self.components}")


def process_batch_size(config: ml_collections.ConfigDict) -> int:
  """Rows of each batch this JAX process reads (`config.data.batch_size` is the global batch)."""
  global_batch = int(config.data.batch_size)
  if not bool(config.data.get("shard_by_process", True)):
    return global_batch
  n = jax.process_count()
  if global_batch % n:
    raise ValueError(f"data.batch_size={global_batch} (the global batch) does not divide over {n} processes")
  return global_batch // n
