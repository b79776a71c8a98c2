"""The train and eval steps: pure functions built by factories, jit-able from outside.

`make_train_step(...)` returns `train_step(state, batch) -> (state, metrics)`; the caller
jits it (`jax.jit(step, donate_argnums=0)`, or with in/out shardings for a mesh). A batch is
a dict of arrays with leading dimension B:

  images uint8 [B, N, H, W, 3], image_mask bool [B, N], input_ids int32 [B, T],
  image_index int32 [B, T], targets int32 [B, T], loss_mask float32 [B, T]

The loss is the family's (`Task.loss_fn`: a sum over counted units, their count and named
metric sums), by default the token-weighted mean of the next-token cross-entropy over
`loss_mask`, computed in float32 whatever the compute dtype. Gradient accumulation splits B into
`grad_accum_steps` micro-batches under `lax.scan` and sums token-weighted gradients, so the
update equals the one of the whole batch at once. A step whose loss or gradient norm is not
finite leaves the state unchanged (and reports `finite=0`); the loop decides to stop or go on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from mmjax.families.base import ApplyFn, LossFn
from mmjax.layers import linear
from mmjax.train.state import TrainState


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "layers": None,  # done inside the model (DecoderConfig.remat); nothing to add here
}


def token_nll(logits: jax.Array, targets: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sum of masked next-token negative log-likelihoods and the number of counted tokens.

  logits [B, T, V], targets int [B, T], loss_mask [B, T] -> (float32 scalar, float32 scalar).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask)


def next_token_loss(apply_fn: ApplyFn) -> LossFn:
  """The language-modelling loss: next-token NLL of `apply_fn`'s logits over `loss_mask`."""
  def loss(params, batch, rng):
    total, count = token_nll(apply_fn(params, batch, rng), batch["targets"], batch["loss_mask"])
    return total, count, {}
  return loss


def _freeze(params, mask):
  # Frozen leaves get stop_gradient, so XLA drops the backward pass through a frozen tower
  # that no trainable parameter feeds (the ViT in the Flamingo recipe).
  return jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, mask)


def make_train_step(*, apply_fn: ApplyFn | None = None, tx: optax.GradientTransformation, mask,
                    schedule: Callable, grad_accum_steps: int = 1, remat: str = "none",
                    loss_fn: LossFn | None = None,
                    param_metrics: Callable[[Any], dict[str, jax.Array]] | None = None) -> Callable:
  """Builds `train_step(state, batch) -> (state, metrics)`.

  mask: pytree of bools over the parameters (True = trainable), fixed for this stage.
  tx: from `mmjax.train.optimizer.make_transform` over the same mask.
  metrics: loss, grad_norm, lr, tokens, images, finite (1.0/0.0), and the family's
    `param_metrics` of the updated parameters (Flamingo's `gate/...` values).
  """
  if grad_accum_steps < 1:
    raise ValueError(f"grad_accum_steps={grad_accum_steps} must be >= 1")
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}; expected one of {sorted(REMAT_POLICIES)}")

  loss_fn = loss_fn or next_token_loss(apply_fn)

  def micro_loss(params, batch, rng):
    total, count, extra = loss_fn(_freeze(params, mask), batch, rng)
    return total, (count, extra)

  if REMAT_POLICIES[remat] is not None:
    plain_loss = micro_loss

    def micro_loss(params, batch, rng):
      with linear.rematerialised():  # the policy sees the projections' dots
        return plain_loss(params, batch, rng)

    micro_loss = jax.checkpoint(micro_loss, policy=REMAT_POLICIES[remat])
  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    b = batch["input_ids"].shape[0]
    if b % grad_accum_steps:
      raise ValueError(f"batch size {b} is not divisible by grad_accum_steps={grad_accum_steps}")
    if grad_accum_steps == 1:
      # No loop of one trip: XLA:CPU runs convolutions inside a while loop 2-3x slower
      # (a ViT with a convolutional stem: 320 against 132 ms per gradient, batch 32).
      (total, (count, extra)), grads = grad_fn(state.params, batch, jax.random.fold_in(rng, 0))
    else:
      micro = jax.tree.map(lambda x: x.reshape((grad_accum_steps, b // grad_accum_steps) + x.shape[1:]), batch)

      def body(carry, xs):
        g_acc, tot_acc, cnt_acc, extra_acc = carry
        mb, i = xs
        (tot, (cnt, ex)), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, g_acc, g), tot_acc + tot, cnt_acc + cnt,
                jax.tree.map(jnp.add, extra_acc, ex)), None

      zeros = jax.tree.map(jnp.zeros_like, state.params)
      first = jax.tree.map(lambda x: x[0], micro)
      extra_shapes = jax.eval_shape(lambda: grad_fn(state.params, first, rng)[0][1][1])
      init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
              jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), extra_shapes))
      (grads, total, count, extra), _ = jax.lax.scan(body, init, (micro, jnp.arange(grad_accum_steps)))
    denom = jnp.maximum(count, 1.0)
    loss = total / denom
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, mask)
    grad_norm = optax.tree.norm(grads)
    # optax mixes Python floats with int32 counts (Adam's bias correction): allow that here
    # even when the caller runs under strict dtype promotion.
    with jax.numpy_dtype_promotion("standard"):
      updates, new_opt = tx.update(grads, state.opt_state, state.params)
    lr = jnp.asarray(schedule(state.step.astype(jnp.float32)), jnp.float32)
    # Frozen leaves are returned as they are (adding a zero update would flip -0.0 to 0.0).
    new_params = jax.tree.map(lambda p, u, t: (p - lr.astype(p.dtype) * u.astype(p.dtype)) if t else p,
                              state.params, updates, mask)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = state.replace(step=state.step + 1, params=keep(new_params, state.params),
                              opt_state=keep(new_opt, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": jnp.asarray(lr, jnp.float32), "tokens": count,
               "finite": finite.astype(jnp.float32)}
    if "image_mask" in batch:
      metrics["images"] = jnp.sum(batch["image_mask"].astype(jnp.float32))
    metrics.update({name: value / denom for name, value in extra.items()})
    if param_metrics is not None:
      metrics.update(param_metrics(new_state.params))
    return new_state, metrics

  return train_step


def make_eval_step(apply_fn: ApplyFn | None = None, loss_fn: LossFn | None = None) -> Callable:
  """Builds `eval_step(params, batch) -> (sum of the loss, count)` (float32 scalars) of
  `loss_fn` (default: the next-token NLL of `apply_fn`)."""
  loss_fn = loss_fn or next_token_loss(apply_fn)

  def eval_step(params, batch):
    total, count, _ = loss_fn(params, batch, jax.random.key(0))
    return total, count
  return eval_step
