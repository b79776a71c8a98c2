"""One process of the multi-process tests (run by `mmjax launch local` or directly).

  mp_worker.py [--out DIR --mesh fsdp=-1 --rules fsdp] [--restore DIR2 --restore-mesh M --restore-rules R]
      --out: 3 steps of the stand-in model on the global mesh; process 0 writes
      losses.json and params.npz (gathered), every process joins the Orbax save of
      DIR/ckpt. --restore: restores DIR2/ckpt onto this job's mesh M (target shardings)
      and checks every parameter's sharding and value, and the step, against
      DIR2/params.npz; exit 1 on a mismatch.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from mmjax.scale import distributed  # noqa: E402

distributed.maybe_initialize()

import jax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from mmjax import sharding as sh  # noqa: E402
from mmjax.train.sharded_step import shard_train_step  # noqa: E402
from tests.scale import standin  # noqa: E402

GLOBAL_BATCH = 8


def _setup(mesh_arg, rules):
  model, boxed, state, mask, train_step = standin.build(trainable=("resampler", "xattn", "lm"))
  mesh = sh.make_mesh({k: int(v) for k, v in (kv.split("=") for kv in mesh_arg.split(","))})
  batch = standin.make_batch(0, GLOBAL_BATCH)
  step = shard_train_step(train_step, jax.eval_shape(lambda: state), jax.eval_shape(lambda: batch), boxed,
                          mesh, sh.get_rules(rules), trainable=mask)
  return state, step


def _local_rows(batch):
  n, i = jax.process_count(), jax.process_index()
  rows = GLOBAL_BATCH // n
  return jax.tree.map(lambda x: x[i * rows:(i + 1) * rows], batch)


def train(args):
  state, step = _setup(args.mesh, args.rules)
  state = step.put_state(jax.device_get(state))
  losses = []
  for i in range(3):
    state, metrics = step(state, step.put_batch(_local_rows(standin.make_batch(100 + i, GLOBAL_BATCH))))
    losses.append(float(metrics["loss"]))
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.abspath(os.path.join(args.out, "ckpt")), state)
  ckpt.wait_until_finished()
  params = multihost_utils.process_allgather(state.params, tiled=True)
  if jax.process_index() == 0:
    with open(os.path.join(args.out, "losses.json"), "w") as f:
      json.dump({"losses": losses, "processes": jax.process_count(), "devices": jax.device_count()}, f)
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(os.path.join(args.out, "params.npz"), step=int(state.step), **flat)
  return 0


def restore(args):
  state, step = _setup(args.restore_mesh, args.restore_rules)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        jax.eval_shape(lambda: state), step.state_shardings)
  restored = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(args.restore, "ckpt")), target)
  want = np.load(os.path.join(args.restore, "params.npz"))
  bad = []
  for (k, v), s in zip(jax.tree_util.tree_flatten_with_path(restored.params)[0], jax.tree.leaves(step.param_shardings)):
    if v.sharding != s:
      bad.append(f"{jax.tree_util.keystr(k)} sharding {v.sharding.spec} != {s.spec}")
    got = multihost_utils.process_allgather(v, tiled=True)
    if not np.array_equal(np.asarray(got), want[jax.tree_util.keystr(k)]):
      bad.append(f"{jax.tree_util.keystr(k)} values differ")
  if int(restored.step) != int(want["step"]):
    bad.append(f"step {int(restored.step)} != {int(want['step'])}")
  print("\n".join(bad) or f"restored {len(want.files) - 1} arrays on {jax.process_count()} process(es)")
  return 1 if bad else 0


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--out")
  parser.add_argument("--mesh", default="fsdp=-1")
  parser.add_argument("--rules", default="fsdp")
  parser.add_argument("--restore")
  parser.add_argument("--restore-mesh", default="fsdp=-1")
  parser.add_argument("--restore-rules", default="fsdp")
  args = parser.parse_args()
  code = train(args) if args.out else 0
  sys.exit(code or (restore(args) if args.restore else 0))
