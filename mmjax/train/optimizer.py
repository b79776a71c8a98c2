"""The optimizer: AdamW with warmup + cosine, global-norm clipping, and freezing by component.

Freezing follows the labels a model family gives its parameters (its components: Flamingo's
`vision`, `resampler`, `xattn`, `lm`; `mmjax.families.base.Family.components`). A *stage* is a set of trainable
components that holds from a given step on; `config.freeze.stages` is a string
`"STEP:comp,comp;STEP:comp,..."`, e.g. `"0:vision,resampler,xattn,lm;300:resampler,xattn"`
trains everything for 300 steps and then runs the Flamingo recipe over frozen towers.

Frozen parameters carry no optimizer state: `optax.multi_transform` routes them to
`optax.set_to_zero()`, whose masked branch stores `optax.MaskedNode` in their place, so a
frozen 7B LM costs no Adam moments. The learning rate is applied outside the transform,
from the global step (`schedule(state.step)`), so that re-initialising the transform at a
stage boundary does not restart warmup.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

@dataclasses.dataclass(frozen=True)
class Stage:
  """From `start_step` on, exactly the components in `trainable` are updated."""
  start_step: int
  trainable: frozenset[str]


def parse_stages(spec: str, components: Sequence[str]) -> tuple[Stage, ...]:
  """Parses `"0:resampler,xattn;500:resampler,xattn,lm"` into stages sorted by start step;
  every name must be one of `components` (the model's labels)."""
  components = tuple(components)
  stages = []
  for part in (p.strip() for p in spec.split(";")):
    if not part:
      continue
    if ":" not in part:
      raise ValueError(f"freeze stage {part!r} must look like 'STEP:component,component'")
    step_str, comps = part.split(":", 1)
    try:
      start = int(step_str)
    except ValueError:
      raise ValueError(f"freeze stage {part!r}: start step {step_str!r} is not an integer") from None
    names = frozenset(c.strip() for c in comps.split(",") if c.strip())
    unknown = names - set(components)
    if unknown:
      raise ValueError(f"freeze stage {part!r} names {sorted(unknown)}, which the model does not have; "
                       f"expected components from {components}")
    if not names:
      raise ValueError(f"freeze stage {part!r} trains nothing; name at least one of {components}")
    stages.append(Stage(start, names))
  stages.sort(key=lambda s: s.start_step)
  if not stages or stages[0].start_step != 0:
    raise ValueError(f"freeze stages {spec!r} must start with a stage at step 0")
  if len({s.start_step for s in stages}) != len(stages):
    raise ValueError(f"freeze stages {spec!r} has two stages at the same step")
  return tuple(stages)


def stage_index(stages: tuple[Stage, ...], step: int) -> int:
  """Index of the stage that holds at `step`."""
  idx = 0
  for i, s in enumerate(stages):
    if step >= s.start_step:
      idx = i
  return idx


def make_schedule(config: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
  """Linear warmup from 0 to `optimizer.lr`, then cosine to `lr * schedule.end_lr_fraction`."""
  opt, sch = config.optimizer, config.schedule
  total = max(int(config.train.num_steps), 1)
  warmup = min(int(sch.warmup_steps), total)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(opt.lr), warmup_steps=warmup,
      decay_steps=max(total, warmup + 1), end_value=float(opt.lr) * float(sch.end_lr_fraction))


def components_of(labels) -> tuple[str, ...]:
  """The component labels a model's label tree uses, sorted."""
  return tuple(sorted(set(jax.tree.leaves(labels))))


def trainable_mask(labels, trainable: frozenset[str]):
  """Pytree of bools: True where the parameter's component label is trainable."""
  return jax.tree.map(lambda label: label in trainable, labels)


def _decay_mask(params):
  # Weight decay on matrices only: decaying norms, biases or the tanh gates pulls them to 0.
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_transform(config: ml_collections.ConfigDict, mask) -> optax.GradientTransformation:
  """Clip + Adam + decoupled weight decay on trainable leaves, `set_to_zero` on frozen ones.

  Returns *unscaled* updates: the step multiplies them by `-schedule(step)` (AdamW's
  learning rate scales the weight decay too, as in `optax.adamw`).
  """
  opt = config.optimizer
  parts = []
  if float(opt.clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(opt.clip_norm)))
  parts.append(optax.scale_by_adam(b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps)))
  if float(opt.weight_decay) > 0:
    parts.append(optax.add_decayed_weights(float(opt.weight_decay), mask=_decay_mask))
  route = jax.tree.map(lambda t: "train" if t else "frozen", mask)
  return optax.multi_transform({"train": optax.chain(*parts), "frozen": optax.set_to_zero()}, route)
