"""What the benchmarks share about the device they run on: its name, a matmul peak sized to it, PyTorch's device
and precision, and the JSON-lines record that their `--out FILE` appends to as figures are measured.

JAX and PyTorch are imported inside the functions: each benchmark side runs in a process of its own and imports
only its own framework.
"""

import contextlib
import json
import os
import platform
import time

# The peak matmul: on a GPU a plain 8192^3 product in the step's compute dtype (what its tensor cores run); on a
# CPU 2048^2 in float32, as the CPU figures of benchmarks/README.md were measured.
GPU_MATMUL, CPU_MATMUL = 8192, 2048


def cpu_name():
  for line in open("/proc/cpuinfo") if os.path.exists("/proc/cpuinfo") else ():
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return platform.processor() or platform.machine()


def jax_device():
  """(platform, name) of JAX's first device: ("cpu", the CPU model) or e.g. ("gpu", "NVIDIA H200")."""
  import jax

  d = jax.devices()[0]
  return d.platform, cpu_name() if d.platform == "cpu" else d.device_kind


def matmul_shape(platform_name, dtype):
  """(n, dtype name) of the peak matmul on this platform for a step computed in `dtype`."""
  if platform_name == "cpu":
    return CPU_MATMUL, "float32"
  return GPU_MATMUL, dtype


def best_of(fn, runs, sync=lambda: None):
  """The fastest of `runs` timed calls of fn (after one untimed call: compilation, allocation)."""
  fn()
  sync()
  best = float("inf")
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    sync()
    best = min(best, time.perf_counter() - start)
  return best


def jax_matmul_peak(dtype):
  """FLOP/s of JAX's square matmul of `matmul_shape`, best of 5."""
  import jax
  import jax.numpy as jnp

  n, name = matmul_shape(jax.devices()[0].platform, dtype)
  a = jnp.ones((n, n), name)
  matmul = jax.jit(lambda x: x @ x)
  return 2 * n**3 / best_of(lambda: jax.block_until_ready(matmul(a)), 5)


def torch_device():
  import torch

  return "cuda" if torch.cuda.is_available() else "cpu"


def torch_device_name(device):
  import torch

  return torch.cuda.get_device_name() if device == "cuda" else cpu_name()


def torch_sync(device):
  """Waits for the queued CUDA work, so that a timing covers it (a no-op on the CPU, which runs eagerly)."""
  import torch

  if device == "cuda":
    torch.cuda.synchronize()


def torch_autocast(device, dtype):
  """The context PyTorch computes in: bfloat16 autocast (float32 weights, as t5jax keeps them), or float32."""
  import torch

  if dtype == "float32":
    return contextlib.nullcontext()
  return torch.autocast(device_type=device, dtype=getattr(torch, dtype))


def torch_matmul_peak(device, dtype):
  """FLOP/s of PyTorch's square matmul of `matmul_shape`, best of 5."""
  import torch

  n, name = matmul_shape("cpu" if device == "cpu" else "gpu", dtype)
  a = torch.ones(n, n, dtype=getattr(torch, name), device=device)
  return 2 * n**3 / best_of(lambda: a @ a, 5, lambda: torch_sync(device))


class Record:
  """Appends one JSON object per line to `path` (None: nowhere), flushed at once: a run cut short keeps what
  it measured."""

  def __init__(self, path, **common):
    self.path, self.common = path, common

  def write(self, kind, **fields):
    if self.path:
      with open(self.path, "a") as f:
        f.write(json.dumps({"kind": kind, **self.common, **fields}) + "\n")
