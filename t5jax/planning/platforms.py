"""Keeps JAX off a TPU runtime that cannot start: libtpu installed (for `plan --topology`) on a host without TPUs.

JAX tries every backend it finds at the first device query. With libtpu present and no TPU chip, the TPU
runtime's start fails after ~0.3 s and prints a page of warnings to stderr on every run and test process,
before falling back to the CPU. So when nothing chose the platforms (JAX_PLATFORMS unset), no TPU is
attached, and no other accelerator plugin (CUDA, ROCm) is installed, the platform is the CPU. Planning is
unaffected: `jax.experimental.topologies` loads libtpu's compiler itself, whatever the platforms.
"""

import glob
import importlib.util
import os
import pkgutil
import sys

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are PCI devices of Google's vendor id (what JAX itself checks)


def tpu_attached():
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path) as f:
        if f.read().strip() == GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def _other_plugins():
  spec = importlib.util.find_spec("jax_plugins")
  return bool(spec and list(pkgutil.iter_modules(spec.submodule_search_locations)))


def cpu_unless_accelerator():
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
    return
  if tpu_attached() or _other_plugins():
    return
  os.environ["JAX_PLATFORMS"] = "cpu"  # inherited by the runs, workers and tests this process starts
  jax = sys.modules.get("jax")
  if jax is not None:  # imported before us: its config already read the environment
    jax.config.update("jax_platforms", "cpu")
