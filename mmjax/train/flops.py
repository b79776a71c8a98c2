"""Peak FLOP/s of the devices, the denominator of MFU.

The numerator, a train step's matmul FLOPs, is each family's own count
(`Task.flops_per_example`, MaxText's convention: see `mmjax.families.base`). MFU is never
divided by a sparse peak.
"""

from __future__ import annotations

import jax

# Dense bf16 peak FLOP/s per device, by `device.device_kind` prefix.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device(override_tflops: float = 0.0) -> float | None:
  """Peak FLOP/s of one local device (config override in TFLOP/s first); None if unknown (CPU)."""
  if override_tflops > 0:
    return override_tflops * 1e12
  kind = jax.devices()[0].device_kind
  for prefix, peak in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
    if kind.startswith(prefix):
      return peak
  return None
