"""Wrong gradients from XLA's SPMD partitioner on a 3-axis mesh: a self-contained reproduction.

    python docs/xla_spmd_repro.py       # exit 0: gradients agree; exit 1: the bug is present

The function is ``x + mean_S(media @ w)`` followed by a softmax cross-entropy through a
``head`` matrix. Sharded over a data x fsdp x tensor = 2x2x2 mesh of CPU devices, with
the batch split over ``(data, fsdp)``, ``w`` split on its output dimension over
``tensor`` and ``head`` over ``(fsdp, tensor)``, the gradients differ from the same
function on one device by about 100% (jax/jaxlib 0.9.2, 0.10.2, 0.11.2 and 0.12.0.1, with Shardy and with
GSPMD propagation; disabling any single HLO pass after partitioning does not remove it,
so it is the partitioning). Any 2-axis mesh, a batch split over all three axes, ``w`` or
``head`` replicated, or ``head`` split on a batch axis that comes first in the batch's
spec, all give the right answer. mmjax's Flamingo does not have this pattern:
``tests/scale/test_three_axis_mesh.py`` checks its gradients on this mesh.
See docs/sharding_notes.md.
"""

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

B, T, S, D, V = 8, 8, 4, 32, 64


def loss(w, head, media, x, targets):
  x = x + (media @ w).mean(axis=1, keepdims=True)
  logp = jax.nn.log_softmax(x @ head)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))


def max_relative_errors(mesh_shape=(2, 2, 2), w_spec=P(None, "tensor"), head_spec=P("fsdp", "tensor"),
                        batch_spec=P(("data", "fsdp"))) -> list[float]:
  """Per argument (w, media, x): max |sharded - single-device| / max |single-device|."""
  rng = np.random.default_rng(0)
  args = ((rng.normal(size=(D, D)) / 6).astype(np.float32), (rng.normal(size=(D, V)) / 6).astype(np.float32),
          rng.normal(size=(B, S, D)).astype(np.float32), rng.normal(size=(B, T, D)).astype(np.float32),
          rng.integers(0, V, (B, T)).astype(np.int32))
  grad = jax.grad(loss, argnums=(0, 2, 3))
  want = jax.jit(grad)(*args)
  devices = np.asarray(jax.devices()[:int(np.prod(mesh_shape))]).reshape(mesh_shape)
  mesh = Mesh(devices, ("data", "fsdp", "tensor"))
  batch = NamedSharding(mesh, batch_spec)
  shardings = (NamedSharding(mesh, w_spec), NamedSharding(mesh, head_spec), batch, batch, batch)
  got = jax.jit(grad, in_shardings=shardings)(*args)
  return [float(np.max(np.abs(np.asarray(g) - np.asarray(r))) / np.max(np.abs(np.asarray(r))))
          for g, r in zip(got, want)]


if __name__ == "__main__":
  errors = max_relative_errors()
  print(f"jax {jax.__version__}: relative gradient error on 2x2x2 (w, media, x): "
        + ", ".join(f"{e:.1e}" for e in errors))
  controls = max_relative_errors(batch_spec=P(("fsdp", "data")))
  print("control, batch over (fsdp, data): " + ", ".join(f"{e:.1e}" for e in controls))
  sys.exit(1 if max(errors) > 1e-4 else 0)
