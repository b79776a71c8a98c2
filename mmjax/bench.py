"""`mmjax bench <what>`: benchmarks. Sub-verbs: ``attention`` (kernels vs XLA and cuDNN),
``contrastive`` (memory of the contrastive losses; see ``contrastive_main``), ``packing``
(LLaVA training throughput with conversations packed several to a row or one per row; see
``packing_main``), ``step`` (the train step of any config, beside the PyTorch original:
`mmjax.bench_step`).

``mmjax bench attention`` sweeps sequence length (512 to 8192), the Flamingo
cross-attention shapes (text length x images x latents), head dim, causal or not and
dtype, and (``--extra-masks``) causal rows with ALiBi (MPT's slopes) and with a sliding
window (Mistral). It prints a table and writes ``<out>.json`` and ``<out>.md``;
``--append`` merges the rows it measures into an existing ``<out>.json`` instead (the
other rows and their date are kept; the new rows' date is recorded beside).

- On a GPU or TPU it times forward and forward+backward of the Pallas kernel, the XLA
  reference and (GPU) cuDNN, and reports TFLOP/s counted the FlashAttention way
  (4·B·H·T·S·K for the forward, halved when causal; backward 2.5x forward) and as a share
  of the device's dense bf16 peak.
- On CPU timings mean nothing (kernels run in interpret mode), so it reports the
  compiled temporary memory (``memory_analysis().temp_size_in_bytes``) of the kernel
  and of the reference, which shows whether memory grows linearly or quadratically with
  length. The CPU kernel is the Pallas GPU kernel in interpret mode, which lowers to
  plain XLA loops over the same tiles (the TPU interpreter runs through host callbacks
  whose buffers memory_analysis cannot see).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import sys
import time

from mmjax import bench_step

# Dense bf16 peak TFLOP/s per device kind (datasheets; never the sparse figure).
PEAK_TFLOPS = {
    "h100": 989.0, "h200": 989.0, "h800": 989.0, "a100": 312.0, "l4": 121.0,
    "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v5": 459.0,
    "tpu v6 lite": 918.0, "tpu v6e": 918.0, "tpu v4": 275.0,
}


@dataclasses.dataclass(frozen=True)
class Shape:
  """One attention shape: B batch, T queries, S keys, H heads, K head dim."""

  kind: str  # "self" or "cross" (Flamingo text -> image latents)
  batch: int
  query_length: int
  key_length: int
  heads: int
  head_dim: int
  causal: bool
  dtype: str
  images: int = 0
  latents: int = 0
  alibi: bool = False  # ALiBi bias with MPT's slopes
  sliding_window: int = 0  # with causal: each query sees this many positions (0: no window)

  def flops(self, backward: bool) -> float:
    """FlashAttention counting: 2 matmuls of 2·T·S·K per head; causal halves it; a
    window W < T leaves about T·W - W²/2 query-key pairs (T²/2 when W = T)."""
    pairs = float(self.query_length * self.key_length)
    if self.causal:
      pairs /= 2
      w = self.sliding_window
      if 0 < w < self.query_length:
        pairs = self.query_length * w - w * w / 2
    fwd = 4.0 * self.batch * self.heads * pairs * self.head_dim
    return fwd * (3.5 if backward else 1.0)


def _shapes(args) -> list[Shape]:
  shapes = []
  for dtype in args.dtypes:
    for head_dim in args.head_dims:
      heads = args.width // head_dim
      for causal in args.causal:
        for length in args.lengths:
          shapes.append(Shape("self", args.batch, length, length, heads, head_dim, causal,
                              dtype))
      for mask in args.extra_masks:
        extra = dict(alibi=True) if mask == "alibi" else dict(sliding_window=args.sliding_window)
        for length in args.lengths:
          shapes.append(Shape("self", args.batch, length, length, heads, head_dim, True, dtype,
                              **extra))
      for text, images, latents in args.cross:
        shapes.append(Shape("cross", args.batch, text, images * latents, heads, head_dim,
                            False, dtype, images, latents))
  return shapes


def _inputs(shape: Shape):
  """Abstract inputs and mask keyword arguments of a shape."""
  import jax
  import jax.numpy as jnp
  dtype = jnp.dtype(shape.dtype)
  q = jax.ShapeDtypeStruct((shape.batch, shape.query_length, shape.heads, shape.head_dim), dtype)
  k = jax.ShapeDtypeStruct((shape.batch, shape.key_length, shape.heads, shape.head_dim), dtype)
  return q, k


def _concrete_inputs(shape: Shape):
  import jax
  import jax.numpy as jnp
  keys = jax.random.split(jax.random.key(0), 3)
  q_abs, k_abs = _inputs(shape)
  q = jax.random.normal(keys[0], q_abs.shape, q_abs.dtype)
  k = jax.random.normal(keys[1], k_abs.shape, k_abs.dtype)
  v = jax.random.normal(keys[2], k_abs.shape, k_abs.dtype)
  return q, k, v


def _alibi_slopes(heads: int):
  """MPT's ALiBi slopes for ``heads`` heads (a power of two): 2^(-8 h / H), h = 1..H."""
  import jax.numpy as jnp
  return 2.0 ** (-8.0 * jnp.arange(1, heads + 1, dtype=jnp.float32) / heads)


def _mask_kwargs(shape: Shape):
  """Mask arguments: causal (with ALiBi or a window if the shape has them), or the
  Flamingo mask with each image's <image> token spread evenly over the text (the first
  tenth of the text sees no image)."""
  import jax.numpy as jnp
  if shape.kind == "self":
    mask = dict(causal=shape.causal)
    if shape.alibi:
      mask["alibi_slopes"] = _alibi_slopes(shape.heads)
    if shape.sliding_window:
      mask["sliding_window"] = shape.sliding_window
    return mask
  t, b = shape.query_length, shape.batch
  starts = (jnp.arange(shape.images, dtype=jnp.int32) + 1) * (t // (shape.images + 1))
  image_index = jnp.searchsorted(starts, jnp.arange(t, dtype=jnp.int32), side="right")
  image_ids = jnp.repeat(jnp.arange(1, shape.images + 1, dtype=jnp.int32), shape.latents)
  return dict(query_image_index=jnp.broadcast_to(image_index.astype(jnp.int32), (b, t)),
              key_image_ids=jnp.broadcast_to(image_ids, (b, shape.key_length)))


def _functions(shape: Shape, backend: str, interpret: bool):
  """(forward, forward+backward) of one backend for a shape, both jitted."""
  import jax
  import jax.numpy as jnp
  from mmjax.kernels.attention import attention
  mask = _mask_kwargs(shape)

  def forward(q, k, v):
    return attention(q, k, v, **mask, backend=backend, interpret=interpret)

  def loss(q, k, v):
    return jnp.sum(forward(q, k, v).astype(jnp.float32))

  return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _temp_bytes(fn, shape: Shape) -> int:
  q, k = _inputs(shape)
  return int(fn.lower(q, k, k).compile().memory_analysis().temp_size_in_bytes)


def _memory_rows(shapes: list[Shape], kernel_backend: str) -> list[dict]:
  rows = []
  for shape in shapes:
    row = dataclasses.asdict(shape)
    for name, backend, interpret in (("kernel", kernel_backend, True), ("xla", "xla", False)):
      fwd, fwd_bwd = _functions(shape, backend, interpret)
      row[f"{name}_fwd_temp_bytes"] = _temp_bytes(fwd, shape)
      row[f"{name}_fwd_bwd_temp_bytes"] = _temp_bytes(fwd_bwd, shape)
    row["fwd_ratio"] = row["xla_fwd_temp_bytes"] / max(row["kernel_fwd_temp_bytes"], 1)
    row["fwd_bwd_ratio"] = row["xla_fwd_bwd_temp_bytes"] / max(row["kernel_fwd_bwd_temp_bytes"], 1)
    rows.append(row)
    print(_memory_line(row), flush=True)
  return rows


def _tpu_memory(rows: list[dict], shapes: list[Shape], topology: str) -> None:
  """Adds per-chip compiled temporary memory on a TPU topology (libtpu AOT on this host):
  the batch is split over all chips, so each chip holds ``batch`` examples."""
  import os
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.experimental import topologies
  from jax.sharding import NamedSharding, PartitionSpec
  from mmjax.kernels.attention import attention
  devices = np.asarray(topologies.get_topology_desc(platform="tpu",
                                                    topology_name=topology).devices).reshape(-1)
  mesh = jax.sharding.Mesh(devices, ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  n = devices.size
  for row, shape in zip(rows, shapes):
    big = dataclasses.replace(shape, batch=shape.batch * n, dtype="bfloat16")
    q, k = _inputs(big)
    shard = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                           sharding=NamedSharding(mesh, PartitionSpec("data")))
    q, k = shard(q), shard(k)
    # Ids split with the batch; the ALiBi slopes (one per head) are replicated.
    mask = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
        mesh, PartitionSpec() if name == "alibi_slopes" else PartitionSpec("data")))
            if hasattr(x, "shape") else x for name, x in _mask_kwargs(big).items()}
    for name, backend in (("kernel", "pallas_tpu"), ("xla", "xla")):
      def forward(q, k, v, mask):
        return attention(q, k, v, **mask, backend=backend, mesh=mesh)

      def loss(q, k, v, mask):
        return jnp.sum(forward(q, k, v, mask).astype(jnp.float32))

      arrays = {key: value for key, value in mask.items() if hasattr(value, "shape")}
      static = {key: value for key, value in mask.items() if not hasattr(value, "shape")}
      for label, fn in (("fwd", forward),
                        ("fwd_bwd", jax.grad(loss, argnums=(0, 1, 2)))):
        compiled = jax.jit(lambda q, k, v, arrays, fn=fn: fn(q, k, v, {**arrays, **static})
                           ).lower(q, k, k, arrays).compile()
        row[f"tpu_{name}_{label}_temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
    print(f"{_shape_label(row):<36} K={row['head_dim']:<4} {topology} per chip bf16: fwd+bwd "
          f"kernel {_mib(row['tpu_kernel_fwd_bwd_temp_bytes'])} MiB, "
          f"xla {_mib(row['tpu_xla_fwd_bwd_temp_bytes'])} MiB", flush=True)


def _time(fn, args, repeats: int) -> float:
  import jax
  jax.block_until_ready(fn(*args))  # compile and warm up
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def _peak(device_kind: str) -> float | None:
  kind = device_kind.lower()
  for name, peak in sorted(PEAK_TFLOPS.items(), key=lambda item: -len(item[0])):
    if name in kind:
      return peak
  return None


def _timing_rows(shapes: list[Shape], backends: list[str], repeats: int, peak) -> list[dict]:
  rows = []
  for shape in shapes:
    args = _concrete_inputs(shape)
    row = dataclasses.asdict(shape)
    for backend in backends:
      fwd, fwd_bwd = _functions(shape, backend, interpret=False)
      for label, fn, backward in (("fwd", fwd, False), ("fwd_bwd", fwd_bwd, True)):
        try:
          seconds = _time(fn, args, repeats)
        except Exception as error:  # A backend that cannot run a shape: record why.
          row[f"{backend}_{label}_error"] = f"{type(error).__name__}: {str(error)[:200]}"
          continue
        tflops = shape.flops(backward) / seconds / 1e12
        row[f"{backend}_{label}_ms"] = seconds * 1e3
        row[f"{backend}_{label}_tflops"] = tflops
        if peak:
          row[f"{backend}_{label}_peak_share"] = tflops / peak
    rows.append(row)
    print(json.dumps(row), flush=True)
  return rows


def _mib(n: int) -> str:
  return f"{n / 2**20:,.1f}"


def _shape_label(row: dict) -> str:
  if row["kind"] == "cross":
    return (f"cross T={row['query_length']} x {row['images']} img x {row['latents']} lat")
  label = f"self T=S={row['query_length']}{' causal' if row['causal'] else ''}"
  if row.get("alibi"):
    label += " alibi"
  if row.get("sliding_window"):
    label += f" window {row['sliding_window']}"
  return label


def _memory_line(row: dict) -> str:
  return (f"{_shape_label(row):<36} K={row['head_dim']:<4} {row['dtype']:<9} "
          f"fwd temp MiB kernel {_mib(row['kernel_fwd_temp_bytes']):>9} "
          f"xla {_mib(row['xla_fwd_temp_bytes']):>10} ({row['fwd_ratio']:,.0f}x)  "
          f"fwd+bwd kernel {_mib(row['kernel_fwd_bwd_temp_bytes']):>9} "
          f"xla {_mib(row['xla_fwd_bwd_temp_bytes']):>10} ({row['fwd_bwd_ratio']:,.0f}x)")


def _markdown(meta: dict, rows: list[dict], mode: str) -> str:
  lines = [f"# Attention benchmark ({mode})", ""]
  lines += [f"- {k}: {'; '.join(v) if isinstance(v, list) else v}" for k, v in meta.items()]
  lines.append("")
  if mode == "memory":
    lines += [
        "Compiled temporary memory (`memory_analysis().temp_size_in_bytes`, MiB) of the "
        "Pallas kernel (GPU kernel, interpret mode: plain XLA loops over the same tiles) "
        "and of the XLA reference. Timings on CPU mean nothing and are not reported.",
        "",
        "| shape | K | dtype | fwd kernel | fwd XLA | ratio | fwd+bwd kernel | fwd+bwd XLA | ratio |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
      lines.append(
          f"| {_shape_label(r)} | {r['head_dim']} | {r['dtype']} | "
          f"{_mib(r['kernel_fwd_temp_bytes'])} | {_mib(r['xla_fwd_temp_bytes'])} | "
          f"{r['fwd_ratio']:,.0f}x | {_mib(r['kernel_fwd_bwd_temp_bytes'])} | "
          f"{_mib(r['xla_fwd_bwd_temp_bytes'])} | {r['fwd_bwd_ratio']:,.0f}x |")
    if rows and "tpu_kernel_fwd_temp_bytes" in rows[0]:
      lines += [
          "",
          f"Per-chip compiled temporary memory (MiB) on TPU `{meta['tpu topology']}`, "
          "compiled ahead of time through libtpu on this host (Mosaic lowering of the "
          "Pallas TPU kernel, bf16, the batch split over the chips so each chip holds "
          "`batch` examples). A temp of 0 means XLA needed no scratch beyond the outputs.",
          "",
          "| shape | K | fwd kernel | fwd XLA | fwd+bwd kernel | fwd+bwd XLA |",
          "|---|---|---:|---:|---:|---:|",
      ]
      for r in rows:
        lines.append(
            f"| {_shape_label(r)} | {r['head_dim']} | {_mib(r['tpu_kernel_fwd_temp_bytes'])} | "
            f"{_mib(r['tpu_xla_fwd_temp_bytes'])} | {_mib(r['tpu_kernel_fwd_bwd_temp_bytes'])} | "
            f"{_mib(r['tpu_xla_fwd_bwd_temp_bytes'])} |")
  else:
    backends = meta["backends"]
    header = "| shape | K | dtype | " + " | ".join(
        f"{b} fwd ms (TF/s, peak) | {b} fwd+bwd ms (TF/s, peak)" for b in backends) + " |"
    lines += [header, "|" + "---|" * (3 + 2 * len(backends))]
    for r in rows:
      cells = []
      for b in backends:
        for label in ("fwd", "fwd_bwd"):
          if f"{b}_{label}_ms" in r:
            share = r.get(f"{b}_{label}_peak_share")
            cells.append(f"{r[f'{b}_{label}_ms']:.3f} ({r[f'{b}_{label}_tflops']:.0f}"
                         + (f", {share:.0%})" if share else ")"))
          else:
            cells.append("error" if f"{b}_{label}_error" in r else "-")
      lines.append(f"| {_shape_label(r)} | {r['head_dim']} | {r['dtype']} | "
                   + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _parse_cross(text: str) -> tuple[int, int, int]:
  try:
    t, n, l = (int(x) for x in text.split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"cross shape {text!r}, expected TEXTxIMAGESxLATENTS like 2048x5x64") from None
  return t, n, l


def attention_main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(prog="mmjax bench attention", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
  parser.add_argument("--cross", type=_parse_cross, nargs="*",
                      default=[(2048, 5, 64), (8192, 16, 64)],
                      help="cross-attention shapes (text to image latents) TEXTxIMAGESxLATENTS")
  parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
  parser.add_argument("--causal", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="*",
                      default=[True, False],
                      help="true and/or false (none: no plain self-attention rows)")
  parser.add_argument("--extra-masks", nargs="*", choices=["alibi", "window"],
                      default=["alibi", "window"],
                      help="also causal rows with ALiBi and/or a sliding window, per length")
  parser.add_argument("--sliding-window", type=int, default=1024,
                      help="the window of the 'window' rows, in positions")
  parser.add_argument("--append", action="store_true",
                      help="merge these rows into OUT.json (same shape: replaced) and rewrite OUT.md")
  parser.add_argument("--dtypes", nargs="+", default=None,
                      help="default: bfloat16 on accelerators, float32 on CPU")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--width", type=int, default=1024, help="heads x head_dim")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--tpu-topology", default="none",
                      help="on CPU, also compile for this TPU topology (e.g. v5e:2x2, needs "
                           "libtpu) and report per-chip memory; 'none' to skip")
  parser.add_argument("--out", default="benchmarks/attention",
                      help="results go to OUT.json and OUT.md")
  args = parser.parse_args(argv)

  import jax
  platform = jax.default_backend()
  device = jax.devices()[0]
  if args.dtypes is None:
    args.dtypes = ["float32"] if platform == "cpu" else ["bfloat16"]
  shapes = _shapes(args)
  meta = {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "device": f"{platform}: {device.device_kind}",
      "jax": jax.__version__,
      "batch": args.batch,
      "heads x head_dim": args.width,
  }
  if platform == "cpu":
    mode = "memory"
    rows = _memory_rows(shapes, "pallas_gpu")
    if args.tpu_topology != "none":
      meta["tpu topology"] = args.tpu_topology
      _tpu_memory(rows, shapes, args.tpu_topology)
  else:
    mode = "timing"
    kernel = "pallas_tpu" if platform == "tpu" else "pallas_gpu"
    backends = [kernel, "xla"] + (["cudnn"] if platform == "gpu" else [])
    peak = _peak(device.device_kind)
    meta.update(backends=backends, peak_tflops=peak)
    rows = _timing_rows(shapes, backends, args.repeats, peak)
  out = pathlib.Path(args.out)
  if args.append and out.with_suffix(".json").exists():
    meta, rows = _merged(json.loads(out.with_suffix(".json").read_text()), meta, mode, rows)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps({"meta": meta, "mode": mode, "rows": rows},
                                                 indent=1) + "\n")
  out.with_suffix(".md").write_text(_markdown(meta, rows, mode))
  print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
  return 0


def _merged(previous: dict, meta: dict, mode: str, rows: list[dict]) -> tuple[dict, list[dict]]:
  """(meta, rows) of ``previous`` results with ``rows`` added: a previous row of the same
  shape is replaced; the previous meta is kept and the new rows' date recorded in it."""
  if previous["mode"] != mode:
    raise ValueError(f"--append: the existing results are {previous['mode']!r}, this run is {mode!r}")
  shape_fields = [field.name for field in dataclasses.fields(Shape)]
  key = lambda row: tuple(row.get(name, Shape.__dataclass_fields__[name].default)
                          for name in shape_fields)
  new = {key(row) for row in rows}
  merged = [row for row in previous["rows"] if key(row) not in new] + rows
  labels = sorted({_shape_label(row).split("=", 1)[1].split(" ", 1)[-1] for row in rows})
  meta_out = dict(previous["meta"])
  appended = list(meta_out.get("appended", []))
  appended.append(f"{meta['date']}, jax {meta['jax']}: {len(rows)} rows ({', '.join(labels)})")
  meta_out["appended"] = appended
  return meta_out, merged


def _contrastive_temp_bytes(loss, mesh, batch: int, width: int, backward: bool) -> int:
  """Compiled per-device temporary bytes of ``loss`` (or its gradient w.r.t. every argument)
  on [batch, width] float32 embeddings split over the mesh's batch axes."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec
  from mmjax.losses import contrastive
  axes = tuple(a for a in contrastive.BATCH_MESH_AXES if a in mesh.axis_names)
  rows = NamedSharding(mesh, PartitionSpec(axes))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
  embeddings = jax.ShapeDtypeStruct((batch, width), jnp.float32, sharding=rows)
  fn = jax.grad(loss, argnums=(0, 1, 2, 3)) if backward else loss
  compiled = jax.jit(fn).lower(embeddings, embeddings, scalar, scalar).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)


def contrastive_main(argv: list[str]) -> int:
  """`mmjax bench contrastive`: compiled per-device temporary memory of the contrastive losses
  (mmjax/losses/contrastive.py) on a data-parallel mesh: SigLIP's sigmoid loss chunked round
  the ring against the same loss with the text embeddings all-gathered ([B/N, B] logits per
  device), CLIP's softmax loss (gathered), and the dense B x B reference jitted on sharded
  inputs (XLA's own partitioning). Forward and forward+backward. Writes OUT.json and OUT.md."""
  parser = argparse.ArgumentParser(prog="mmjax bench contrastive", description=contrastive_main.__doc__)
  parser.add_argument("--batch", type=int, default=4096, help="global batch B")
  parser.add_argument("--width", type=int, default=256, help="embedding width D")
  parser.add_argument("--devices", type=int, default=8,
                      help="devices on the data axis; on CPU this many host devices are made")
  parser.add_argument("--out", default="benchmarks/contrastive",
                      help="results go to OUT.json and OUT.md")
  args = parser.parse_args(argv)

  import jax
  if "--xla_force_host_platform_device_count" not in __import__("os").environ.get("XLA_FLAGS", ""):
    try:  # only possible before JAX's backends start; harmless off CPU
      jax.config.update("jax_num_cpu_devices", args.devices)
    except RuntimeError:
      pass
  if len(jax.devices()) < args.devices:
    print(f"mmjax bench contrastive: {args.devices} devices asked for, {len(jax.devices())} present "
          f"(on CPU set XLA_FLAGS=--xla_force_host_platform_device_count={args.devices})",
          file=sys.stderr)
    return 2
  from mmjax import sharding
  from mmjax.losses import contrastive
  mesh = sharding.make_mesh({"data": args.devices}, jax.devices()[:args.devices])
  losses = {
      "sigmoid_chunked": lambda x, y, s, b: contrastive.sigmoid_contrastive_loss(x, y, s, b, mesh=mesh),
      "sigmoid_gathered": lambda x, y, s, b: contrastive.sigmoid_contrastive_loss(
          x, y, s, b, mesh=mesh, chunked=False),
      "sigmoid_dense_reference": contrastive.sigmoid_contrastive_loss_reference,
      "softmax_gathered": lambda x, y, s, b: contrastive.softmax_contrastive_loss(x, y, s, mesh=mesh),
  }
  rows = []
  for name, loss in losses.items():
    row = {"loss": name}
    for label, backward in (("fwd", False), ("fwd_bwd", True)):
      row[f"{label}_temp_bytes"] = _contrastive_temp_bytes(loss, mesh, args.batch, args.width, backward)
    rows.append(row)
    print(f"{name:<24} fwd {_mib(row['fwd_temp_bytes'])} MiB  fwd+bwd {_mib(row['fwd_bwd_temp_bytes'])} MiB")
  by_name = {row["loss"]: row for row in rows}
  ratio = by_name["sigmoid_gathered"]["fwd_bwd_temp_bytes"] / by_name["sigmoid_chunked"]["fwd_bwd_temp_bytes"]
  device = jax.devices()[0]
  meta = {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "device": f"{args.devices} x {device.platform}: {device.device_kind}",
      "jax": jax.__version__, "batch": args.batch, "width": args.width, "mesh": {"data": args.devices},
      "gathered_over_chunked_fwd_bwd": round(ratio, 2),
  }
  print(f"sigmoid fwd+bwd: gathered / chunked = {ratio:.1f}x")
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
  lines = [f"# Contrastive losses: compiled per-device temporary memory", "",
           f"{meta['date']}, {meta['device']}, jax {meta['jax']}; global batch B={args.batch}, "
           f"width D={args.width}, float32, mesh data={args.devices} (b = B/N = {args.batch // args.devices} "
           f"rows per device). `memory_analysis().temp_size_in_bytes` of the compiled loss (fwd) and of "
           f"its gradient w.r.t. both embeddings, logit_scale and logit_bias (fwd+bwd), MiB.", "",
           "| loss | fwd | fwd+bwd |", "|---|---:|---:|"]
  lines += [f"| {row['loss']} | {_mib(row['fwd_temp_bytes'])} | {_mib(row['fwd_bwd_temp_bytes'])} |"
            for row in rows]
  lines += ["", f"Chunked SigLIP (fwd+bwd) holds {ratio:.1f}x less than the gathered one.", ""]
  out.with_suffix(".md").write_text("\n".join(lines))
  print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
  return 0


PACKING_ARMS = ("unpacked", "packed")


def _batch_counts(batch: dict) -> dict[str, float]:
  """What one host batch carries: padded tokens (B x its length: a bucketed batch is cut
  shorter), real tokens (segment_ids > 0), loss-carrying tokens, conversations (segments),
  image slots in use; its longest and shortest conversation and the most images in a row."""
  import numpy as np
  segments = np.asarray(batch["segment_ids"])
  lengths = [n for row in segments for n in np.bincount(row)[1:].tolist() if n]
  return {"padded_tokens": float(segments.size), "real_tokens": float(np.count_nonzero(segments)),
          "loss_tokens": float(np.sum(batch["loss_mask"])),
          "conversations": float(np.sum(segments.max(axis=-1))),
          "images": float(np.count_nonzero(batch["image_mask"])),
          "longest_conversation": float(max(lengths)), "shortest_conversation": float(min(lengths)),
          "most_images_in_a_row": float(np.asarray(batch["image_mask"]).sum(axis=-1).max())}


# The packing arms are `mmjax bench step`'s arms over LLaVA batches, counted the packing way.
_PackingArm = bench_step.StepArm
_spread = bench_step.spread


def _packing_arm(name: str, config, batches_needed: int, initial_state=None) -> _PackingArm:
  """`bench_step.step_arm` with each batch counted by `_batch_counts` (real tokens, conversations)."""
  return bench_step.step_arm(name, config, batches_needed, initial_state=initial_state, count=_batch_counts)


RATE_NAMES = ("steps_per_s", "padded_tokens_per_s", "real_tokens_per_s", "loss_tokens_per_s",
              "conversations_per_s")


def _arm_rates(arm: _PackingArm, steps: int) -> list[dict[str, float]]:
  """Per round: steps/s, and tokens (padded, real, loss-carrying) and conversations per second."""
  rounds = []
  for r, seconds in enumerate(arm.seconds):
    window = arm.counts[r * steps:(r + 1) * steps]
    total = lambda key: sum(c[key] for c in window)
    rounds.append({"steps_per_s": steps / seconds, "padded_tokens_per_s": total("padded_tokens") / seconds,
                   "real_tokens_per_s": total("real_tokens") / seconds,
                   "loss_tokens_per_s": total("loss_tokens") / seconds,
                   "conversations_per_s": total("conversations") / seconds})
  return rounds


def _arm_summary(arm: _PackingArm, steps: int, batch: int) -> dict:
  import numpy as np
  rounds = _arm_rates(arm, steps)
  mean = lambda key: float(np.mean([c[key] for c in arm.counts]))
  return {
      "max_slots": arm.max_slots,
      **{name: _spread([r[name] for r in rounds]) for name in RATE_NAMES},
      "real_tokens_per_step": mean("real_tokens"), "loss_tokens_per_step": mean("loss_tokens"),
      "conversations_per_step": mean("conversations"), "images_per_row": mean("images") / batch,
      "padded_tokens_per_step": mean("padded_tokens"),
      "padding_fraction": 1.0 - mean("real_tokens") / mean("padded_tokens"),
      "longest_conversation": max(c["longest_conversation"] for c in arm.counts),
      "shortest_conversation": min(c["shortest_conversation"] for c in arm.counts),
      "compile_s": arm.compile_s, "data_s_per_batch": arm.data_s_per_batch,
      "round_seconds": arm.seconds, "rounds": rounds,
  }


def _packing_markdown(runs: list[dict]) -> str:
  lines = ["# LLaVA training: conversations packed several to a row vs one per row", "",
           "Made with `mmjax bench packing` (`--config.data.text_length=224 --append` for the longer rows). "
           "Each run builds the task twice (`data.pack` False, then True; no `init.from_workdir`: both arms "
           "start from the same fresh parameters), each with the trainer's own jitted step "
           "(`mmjax.train.loop`'s plan: mesh, optimizer, freezing as `mmjax train`), compiles and warms it up "
           "on an untimed batch, then times alternating rounds (the arm that goes first alternates) of the "
           "same number of steps on batches drawn beforehand from the real pipeline (the host pipeline is "
           "not timed; its seconds per batch are listed). The packed arm gets as many image slots per row as "
           "its rows can fill (the text length over the shortest conversation, times the most images one "
           "has): every embedded conversation has an image, and the tower runs on every slot, used or not. "
           "Real tokens: segment_ids > 0; padding: 1 - real / padded (B x T); loss tokens: loss_mask = 1 "
           "(the assistant's answers); images/row: slots in use. Rates are medians over rounds, [min, max] "
           "beside; ratios are taken per round (the two arms of a round ran within seconds of each other, "
           "so a load change on a shared machine moves both).", ""]
  for run in runs:
    m, arms, ratios = run["meta"], run["arms"], run["ratios"]
    lines += [f"## {m['config']}, B={m['batch']}, T={m['text_length']}"
              + (f" ({' '.join(m['overrides'])})" if m["overrides"] else ""), "",
              f"{m['date']}; {m['machine']}; jax {m['jax']} on {m['device']}; {m['rounds']} rounds x "
              f"{m['steps']} steps per arm; image slots per row: unpacked {arms['unpacked']['max_slots']}, "
              f"packed {arms['packed']['max_slots']} ({m['tokens_per_slot']} tokens each); "
              + (f"unpacked rows cut to length buckets {m['buckets']}; " if m.get("buckets") else "")
              + "load average "
              f"(1, 5, 15 min) {m['load_before']} before, {m['load_after']} after"
              + (" (the machine was shared with other work)" if m["shared"] else "") + "; "
              f"{m['wall_s']:.0f} s in all.", "",
              "| arm | steps/s | padded tok/s | real tok/s | conversations/s | real tok/step | loss tok/step "
              "| conversations/step | images/row | padding | longest conv. | compile s | data s/batch |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in PACKING_ARMS:
      a = arms[name]
      rate = lambda key, fmt: (f"{format(a[key]['median'], fmt)} [{format(a[key]['min'], fmt)}, "
                               f"{format(a[key]['max'], fmt)}]")
      lines.append(f"| {name} | {rate('steps_per_s', '.2f')} | {rate('padded_tokens_per_s', ',.0f')} | "
                   f"{rate('real_tokens_per_s', ',.0f')} | {rate('conversations_per_s', ',.1f')} | "
                   f"{a['real_tokens_per_step']:,.0f} | {a['loss_tokens_per_step']:,.0f} | "
                   f"{a['conversations_per_step']:.1f} | {a['images_per_row']:.2f} | {a['padding_fraction']:.1%} | "
                   f"{a['longest_conversation']:.0f} | {a['compile_s']:.1f} | {a['data_s_per_batch']:.3f} |")
    ratio = lambda key: f"{ratios[key]['median']:.2f}x [{ratios[key]['min']:.2f}, {ratios[key]['max']:.2f}]"
    lines += ["", f"Packed / unpacked, per round: real tokens/s {ratio('real_tokens_per_s')}, conversations/s "
              f"{ratio('conversations_per_s')}, steps/s {ratio('steps_per_s')}.", ""]
  return "\n".join(lines)


def _run_key(run: dict) -> tuple:
  return run["meta"]["config"], tuple(run["meta"]["overrides"])


def packing_main(argv: list[str]) -> int:
  """`mmjax bench packing`: LLaVA training throughput with `data.pack` off and on. Builds the
  task twice from a fresh init, the trainer's jitted step for each, and times alternating
  rounds after compiling and warming up; reports steps/s, padded, real (segment_ids > 0) and
  loss-carrying tokens/s, conversations/s, padding, and the packed/unpacked ratios per round.
  The packed arm gets as many image slots per row as its rows can fill (`--packed-max-slots`
  to choose): every embedded conversation has an image, so with the config's one slot a row
  holds one conversation, packed or not; and the tower runs on every slot, used or not, so
  more slots than a row can fill only cost. Extra `--config.x=y` overrides apply to both
  arms, except `data.buckets` (length buckets, the other cure for padding), which only the
  unpacked arm takes. Writes OUT.json and OUT.md."""
  parser = argparse.ArgumentParser(prog="mmjax bench packing", description=packing_main.__doc__)
  parser.add_argument("--config", default="llava/tiny_stage2", help="a llava config: a file or a shipped name")
  parser.add_argument("--data-dir", default=None,
                      help="default: $MMJAX_DATA_DIR, else ~/.cache/mmjax/data (the embedded data is built there "
                           "when absent)")
  parser.add_argument("--rounds", type=int, default=10,
                      help="alternating rounds per arm (short rounds follow a shared machine's load closely)")
  parser.add_argument("--steps", type=int, default=5, help="train steps per round")
  parser.add_argument("--packed-max-slots", type=int, default=0,
                      help="image slots per row of the packed arm (0: as many as the unpacked arm's conversations "
                           "could fill: text_length // its shortest conversation x the most images one has; at "
                           "least the config's data.max_slots)")
  parser.add_argument("--append", action="store_true",
                      help="add this run to OUT.json (a run of the same config and overrides is replaced)")
  parser.add_argument("--out", default="benchmarks/llava", help="results go to OUT.json and OUT.md")
  args, overrides = bench_step.parse_round_args(parser, argv)
  load_before = [round(x, 2) for x in os.getloadavg()]
  began = time.perf_counter()

  import jax
  from mmjax import data as data_lib
  from mmjax.families.llava import task as llava_task
  from mmjax.train import config as config_lib
  data_dir = os.path.abspath(os.path.expanduser(args.data_dir or data_lib.default_data_dir()))

  def load(pack: bool, max_slots: int | None = None):
    forced = [f"--config.data.dir={data_dir}", f"--config.data.pack={pack}", "--config.init.from_workdir="]
    forced += [] if max_slots is None else [f"--config.data.max_slots={max_slots}"]
    config = config_lib.load_config(args.config, [*overrides, *forced])
    if pack and "buckets" in config.data:  # a packed row is full by design: one length
      config.data.buckets = ()
    return config

  unpacked_config = load(False, None)
  if str(unpacked_config.model.get("family", "")) != "llava":
    raise ValueError(f"--config={args.config} is a {unpacked_config.model.get('family')!r} config; expected a "
                     "llava one (packing is the llava family's data option)")
  if str(unpacked_config.data.name) == "embedded":
    try:
      data_lib.tokenizer_path(data_dir)
    except (OSError, ValueError, KeyError):
      print(f"mmjax bench packing: no dataset in {data_dir}; building the embedded dataset there", flush=True)
      data_lib.build_embedded(data_dir, log=lambda m: print(f"mmjax bench packing:   {m}", flush=True))
  batch, length = int(unpacked_config.data.batch_size), int(unpacked_config.data.text_length)
  tokens_per_slot = llava_task.model_config(unpacked_config).tokens_per_slot
  needed = args.rounds * args.steps
  arms = {"unpacked": _packing_arm("unpacked", unpacked_config, needed)}
  # Unpacked, a row is one conversation: the shortest one seen bounds how many share a
  # packed row, and each brings at most the most images one row held.
  counts = arms["unpacked"].counts
  fill = (length // int(min(c["shortest_conversation"] for c in counts))
          * int(max(c["most_images_in_a_row"] for c in counts)))
  packed_slots = args.packed_max_slots or max(llava_task.slots(unpacked_config), fill)
  fresh, arms["unpacked"].fresh_state = arms["unpacked"].fresh_state, None
  arms["packed"] = _packing_arm("packed", load(True, packed_slots), needed, initial_state=fresh)
  for r in range(args.rounds):
    order = PACKING_ARMS if r % 2 == 0 else PACKING_ARMS[::-1]
    for name in order:
      arms[name].time_round(args.steps)
    print(f"round {r + 1}/{args.rounds}: " + ", ".join(
        f"{name} {args.steps / arms[name].seconds[-1]:.2f} steps/s" for name in PACKING_ARMS), flush=True)
  summaries = {name: _arm_summary(arm, args.steps, batch) for name, arm in arms.items()}
  ratios = {}
  for key in ("real_tokens_per_s", "conversations_per_s", "steps_per_s"):
    per_round = [p[key] / u[key] for p, u in zip(summaries["packed"]["rounds"], summaries["unpacked"]["rounds"])]
    ratios[key] = {**_spread(per_round), "rounds": per_round}
  load_after = [round(x, 2) for x in os.getloadavg()]
  device = jax.devices()[0]
  cpus = os.cpu_count() or 1
  meta = {
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "machine": f"{platform.platform()}, {platform.machine()}, {cpus} CPUs",
      "device": f"{jax.device_count()} x {device.platform}: {device.device_kind}",
      "jax": jax.__version__, "config": args.config, "overrides": overrides, "batch": batch,
      "text_length": length, "buckets": list(unpacked_config.data.get("buckets", ()) or ()),
      "tokens_per_slot": tokens_per_slot, "rounds": args.rounds, "steps": args.steps,
      # Other work on the machine: a 1-minute load above half a core before this run started.
      "load_before": load_before, "load_after": load_after, "shared": load_before[0] > 0.5,
      "wall_s": time.perf_counter() - began,
  }
  run = {"meta": meta, "arms": summaries, "ratios": ratios}
  for name in PACKING_ARMS:
    a = summaries[name]
    print(f"{name:<9} {a['steps_per_s']['median']:.2f} steps/s, real {a['real_tokens_per_s']['median']:,.0f} "
          f"tok/s of {a['padded_tokens_per_s']['median']:,.0f} padded ({a['padding_fraction']:.1%} padding), "
          f"{a['conversations_per_step']:.1f} conversations/step, {a['loss_tokens_per_step']:.0f} loss tok/step")
  print(f"packed / unpacked: real tokens/s {ratios['real_tokens_per_s']['median']:.2f}x, conversations/s "
        f"{ratios['conversations_per_s']['median']:.2f}x, steps/s {ratios['steps_per_s']['median']:.2f}x")
  out = pathlib.Path(args.out)
  runs = [run]
  if args.append and out.with_suffix(".json").exists():
    previous = json.loads(out.with_suffix(".json").read_text())["runs"]
    runs = [r for r in previous if _run_key(r) != _run_key(run)] + [run]
  out.parent.mkdir(parents=True, exist_ok=True)
  out.with_suffix(".json").write_text(json.dumps({"runs": runs}, indent=1) + "\n")
  out.with_suffix(".md").write_text(_packing_markdown(runs))
  print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
  return 0


VERBS = {
    "attention": (attention_main, "attention kernels vs the XLA reference (and cuDNN on GPU)"),
    "contrastive": (contrastive_main, "memory of the chunked SigLIP loss vs the gathered one"),
    "packing": (packing_main, "LLaVA train-step tokens/s with conversations packed vs one per row"),
    "step": (bench_step.main, "the trainer's train step of any config (--compare: the PyTorch original)"),
}


def _usage() -> str:
  lines = ["usage: mmjax bench <what> [options]", "", "benchmarks:"]
  lines += [f"  {name:<13}{help_}" for name, (_, help_) in VERBS.items()]
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  if not argv or argv[0] in ("-h", "--help"):
    print(_usage())
    return 0
  if argv[0] not in VERBS:
    print(f"mmjax bench: unknown benchmark {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
    return 2
  return VERBS[argv[0]][0](argv[1:]) or 0
