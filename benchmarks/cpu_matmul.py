"""Issue 20's minimal reproduction: one feed-forward block's forward and backward, a plain
jitted JAX function against the same function in torch, on the CPU, no mmjax code.

    python benchmarks/cpu_matmul.py                      # both shapes, all arms, alternating
    taskset -c 0 python benchmarks/cpu_matmul.py         # the same on one core
    python benchmarks/cpu_matmul.py --flags='--xla_cpu_multi_thread_eigen=false;--xla_cpu_use_onednn=true'

The block is y = gelu(x @ w1) @ w2 with loss mean(y^2), gradients for x, w1 and w2: the
feed-forward of issue 20's LM at its two sizes (rows = batch x tokens). Arms:

- ``jax-2d``: x as [rows, d] (what mmjax's dense layer does: leading dimensions merged);
- ``jax-3d``: x as [batch, tokens, d] contracted with einsum (what ``nn.DenseGeneral`` did);
- ``torch``: the same block in torch, with its default threads, and ``torch-1t`` on one thread;
- ``jax-mm`` / ``torch-mm``: one forward product [rows, d] @ [d, f] alone, the GEMM itself.

Rounds alternate over the arms (the order rotates each round); each round times
``--iters`` calls after a warm-up. Printed per arm: median seconds per call and [min, max]
over rounds, and each arm's median ratio to torch's per round. With ``--flags``, every
flag set (and the default, empty) runs the jax arms in its own subprocess, the subprocesses
taking turns, round by round, so that all share the machine's state alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {  # name: (batch, tokens, d, f), issue 20's LM feed-forward
    "small": (8, 64, 256, 1024),
    "large": (8, 256, 512, 2048),
}


def jax_arms(batch, tokens, d, f, seed=0):
  import jax
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((batch, tokens, d)), jnp.float32)
  w1 = jnp.asarray(rng.standard_normal((d, f)) / np.sqrt(d), jnp.float32)
  w2 = jnp.asarray(rng.standard_normal((f, d)) / np.sqrt(f), jnp.float32)

  def loss2d(x, w1, w2):
    h = jax.nn.gelu(x.reshape(-1, d) @ w1, approximate=False)
    return jnp.mean((h @ w2) ** 2)

  def loss3d(x, w1, w2):
    h = jax.nn.gelu(jnp.einsum("btd,df->btf", x, w1), approximate=False)
    return jnp.mean(jnp.einsum("btf,fd->btd", h, w2) ** 2)

  g2 = jax.jit(jax.value_and_grad(loss2d, argnums=(0, 1, 2)))
  g3 = jax.jit(jax.value_and_grad(loss3d, argnums=(0, 1, 2)))
  mm = jax.jit(lambda x, w: x.reshape(-1, d) @ w)
  return {
      "jax-2d": lambda: jax.block_until_ready(g2(x, w1, w2)),
      "jax-3d": lambda: jax.block_until_ready(g3(x, w1, w2)),
      "jax-mm": lambda: jax.block_until_ready(mm(x, w1)),
  }, (x, w1, w2, g2)


def torch_arms(batch, tokens, d, f, seed=0):
  import numpy as np
  import torch
  rng = np.random.default_rng(seed)
  x = torch.tensor(rng.standard_normal((batch, tokens, d)), dtype=torch.float32, requires_grad=True)
  w1 = torch.tensor(rng.standard_normal((d, f)) / np.sqrt(d), dtype=torch.float32, requires_grad=True)
  w2 = torch.tensor(rng.standard_normal((f, d)) / np.sqrt(f), dtype=torch.float32, requires_grad=True)
  default_threads = torch.get_num_threads()

  def block():
    loss = torch.mean((torch.nn.functional.gelu(x @ w1) @ w2) ** 2)
    grads = torch.autograd.grad(loss, (x, w1, w2))
    return loss, grads

  def with_threads(n, fn):
    def run():
      torch.set_num_threads(n)
      try:
        return fn()
      finally:
        torch.set_num_threads(default_threads)
    return run

  def mm():
    with torch.no_grad():
      return x.reshape(-1, d) @ w1

  return {"torch": block, "torch-1t": with_threads(1, block), "torch-mm": mm}, block, default_threads


def time_calls(fn, iters: int) -> float:
  """Seconds per call of `fn`, over `iters` calls in a row."""
  began = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - began) / iters


def time_rounds(arms: dict, rounds: int, iters: int) -> dict[str, list[float]]:
  for fn in arms.values():  # warm-up: compile, allocate
    fn(), fn()
  names = list(arms)
  times = {n: [] for n in names}
  for r in range(rounds):
    order = names[r % len(names):] + names[:r % len(names)]
    for n in order:
      times[n].append(time_calls(arms[n], iters))
  return times


def summarise(times: dict[str, list[float]], base: str | None) -> list[dict]:
  rows = []
  for n, ts in times.items():
    row = {"arm": n, "median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "max_ms": 1e3 * max(ts)}
    ref = base + "-mm" if n.endswith("-mm") else base  # a product alone against a product alone
    if ref in times:
      row["speed_vs"] = ref
      row["speed_ratio"] = statistics.median(b / t for t, b in zip(ts, times[ref]))
    rows.append(row)
  return rows


def check_same(shape) -> float:
  """The two implementations compute the same thing: the largest relative difference of
  loss and gradients between jax-2d and torch (float32)."""
  import numpy as np
  _, (x, w1, w2, g2) = jax_arms(*shape)
  _, block, _ = torch_arms(*shape)
  (jl, jg), (tl, tg) = g2(x, w1, w2), block()
  worst = abs(float(jl) - tl.item()) / abs(tl.item())
  for a, b in zip(jg, tg):
    b = b.detach().numpy()
    worst = max(worst, float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b))))
  return worst


def child(args) -> None:
  """One flag set's jax arms, a round at a time on request (stdin lines), times on stdout."""
  import jax
  shape = SHAPES[args.shape]
  arms, _ = jax_arms(*shape)
  arms = {n: arms[n] for n in ("jax-2d", "jax-3d")}
  for fn in arms.values():
    fn(), fn()
  print(json.dumps({"ready": True, "jax": jax.__version__}), flush=True)
  for _ in sys.stdin:
    print(json.dumps({n: time_calls(fn, args.iters) for n, fn in arms.items()}), flush=True)


def sweep(args) -> dict:
  """Each flag set's jax arms in its own process, the processes taking turns round by round."""
  results = {}
  for shape in args.shapes:
    procs = {}
    for flags in [""] + [f.strip() for f in args.flags.split(";") if f.strip()]:
      env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
      procs[flags] = subprocess.Popen(
          [sys.executable, __file__, "--child", "--shape", shape, "--iters", str(args.iters)],
          env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for f, p in list(procs.items()):  # wait for each to compile and warm up
      if not p.stdout.readline():  # an unknown flag or value: XLA refuses it at start-up
        print(f"cpu_matmul: XLA_FLAGS {f!r} did not start (exit {p.wait()}); left out", flush=True)
        results.setdefault("refused", []).append(f)
        del procs[f]
    times = {f: {"jax-2d": [], "jax-3d": []} for f in procs}
    for _ in range(args.rounds):
      for f, p in procs.items():
        p.stdin.write("go\n")
        p.stdin.flush()
        for n, t in json.loads(p.stdout.readline()).items():
          times[f][n].append(t)
    for p in procs.values():
      p.stdin.close()
      p.wait()
    results[shape] = {f or "(default)": {n: 1e3 * statistics.median(ts) for n, ts in arm.items()}
                      for f, arm in times.items()}
  return results


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--flags", default=None,
                      help="XLA_FLAGS sets to sweep (jax arms only), each against the default, "
                           "separated by ';' (--flags='--a=1;--b=2 --c=3')")
  parser.add_argument("--json", default=None, help="also write the results here")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--shape", default="small", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    return child(args)
  load = os.getloadavg()[0]
  out = {"load_1min_at_start": load, "affinity": sorted(os.sched_getaffinity(0))}
  if args.flags is not None:
    out["sweep"] = sweep(args)
    for shape, sets in out["sweep"].items():
      if shape == "refused":
        continue
      base = sets["(default)"]
      for f, ms in sets.items():
        print(f"{shape:6s} {f:60s} jax-2d {ms['jax-2d']:8.2f} ms ({base['jax-2d'] / ms['jax-2d']:.2f}x)  "
              f"jax-3d {ms['jax-3d']:8.2f} ms ({base['jax-3d'] / ms['jax-3d']:.2f}x)")
  else:
    import jax
    import torch
    out.update(jax=jax.__version__, torch=torch.__version__, shapes={})
    for shape in args.shapes:
      dims = SHAPES[shape]
      jarms, _ = jax_arms(*dims)
      tarms, _, threads = torch_arms(*dims)
      times = time_rounds({**jarms, **tarms}, args.rounds, args.iters)
      rows = summarise(times, "torch")
      out["shapes"][shape] = {"dims": dims, "torch_threads": threads, "rows": rows, "max_rel_diff": check_same(dims)}
      print(f"{shape}: batch {dims[0]}, tokens {dims[1]}, d {dims[2]}, f {dims[3]}; torch threads "
            f"{threads}; jax-2d vs torch max rel diff {out['shapes'][shape]['max_rel_diff']:.1e}")
      for row in rows:
        print(f"  {row['arm']:9s} {row['median_ms']:8.2f} ms [{row['min_ms']:.2f}, {row['max_ms']:.2f}]"
              f"  speed vs {row['speed_vs']} {row['speed_ratio']:.2f}x")
  out["load_1min_at_end"] = os.getloadavg()[0]
  print(f"load average (1 min): {load:.2f} at start, {out['load_1min_at_end']:.2f} at end")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(out, fh, indent=1)


if __name__ == "__main__":
  main()
