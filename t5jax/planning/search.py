"""`plan --search`: plans a small grid (mesh factorizations, remat policy, microbatches, scan) for a topology,
each point in its own `python -m t5jax.plan` process under a time limit, and ranks the ones that fit by their
roofline step time, with the `--config` overrides that select each."""

import concurrent.futures
import itertools
import json
import subprocess
import sys

from absl import flags

from t5jax.model import T5Config
from t5jax.planning import roofline

_GRID_KEYS = ("--config.model.remat_policy=", "--config.grad_accum_steps=", "--config.model.scan_layers=")


def define_flags():
  flags.DEFINE_bool(
    "search",
    False,
    "Plan a grid of meshes, remat policies, microbatches and scan settings for "
    "--topology and rank those that fit by roofline step time.",
  )
  flags.DEFINE_string(
    "search_meshes",
    "auto",
    "';'-separated meshes (data=2,fsdp=8;fsdp=16) or 'auto': every "
    "data x fsdp x tensor (tensor 1 or 2; experts too for MoE) the batch divides over.",
  )
  flags.DEFINE_list("search_remat", ["none", "full"], "remat_policy values to try.")
  flags.DEFINE_list("search_microbatches", ["1"], "grad_accum_steps values to try.")
  flags.DEFINE_list("search_scan", ["True"], "scan_layers values to try (unscanned compiles are slow).")
  flags.DEFINE_integer("search_timeout", 900, "Seconds one point may compile before it is given up.")
  flags.DEFINE_integer("search_workers", 1, "Points compiled at once (each compile is one process).")


def auto_meshes(num_devices, config):
  """Mesh sizes over num_devices: data x fsdp x tensor (tensor 1 or 2), x expert for a MoE model, whose
  data x fsdp divides the batch."""
  divisors = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
  num_experts = T5Config.from_dict(config.model.to_dict()).num_experts
  experts = [e for e in divisors if num_experts and num_experts % e == 0] or [1]
  meshes = []
  for tensor, expert, data in itertools.product((1, 2), experts, divisors):
    fsdp, rest = divmod(num_devices, tensor * expert * data)
    if rest == 0 and fsdp >= 1 and config.batch_size % (data * fsdp) == 0:
      meshes.append({"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert})
  return meshes


def _mesh_arg(sizes):
  return ",".join(f"{a}={n}" for a, n in sizes.items() if n > 1) or "data=1"


def points(f, num_devices, config):
  """[(mesh argument, [config overrides])] of the grid the flags describe."""
  if f.search_meshes == "auto":
    meshes = [_mesh_arg(m) for m in auto_meshes(num_devices, config)]
  else:
    meshes = [m.strip() for m in f.search_meshes.split(";") if m.strip()]
  grid = itertools.product(meshes, f.search_remat, f.search_microbatches, f.search_scan)
  return [(mesh, [k + v for k, v in zip(_GRID_KEYS, values, strict=True)]) for mesh, *values in grid]


def _run_point(base_argv, mesh, overrides, timeout):
  command = [sys.executable, "-m", "t5jax.plan", *base_argv, f"--mesh={mesh}", *overrides, "--json=-"]
  point = {"mesh": mesh, "overrides": overrides}
  try:
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {**point, "fits": None, "error": f"no compile within {timeout} s"}
  if out.returncode != 0 or not out.stdout.strip():
    errors = [line for line in out.stderr.splitlines() if "error:" in line] or out.stderr.splitlines()[-1:]
    return {**point, "fits": None, "error": errors[-1] if errors else f"exit {out.returncode}"}
  result = json.loads(out.stdout[out.stdout.index("{") :])
  return {**result, "mesh_sizes": result["mesh"], **point}  # "mesh": the --mesh argument that selects it


def search(argv, topology):
  """Plans every point and prints them ranked; returns the list (also written to --json)."""
  f = flags.FLAGS
  config = f.config
  base = [
    a
    for a in argv[1:]
    if not a.startswith(("--search", "--mesh=", "--json=", "--hlo=") + _GRID_KEYS) and a != "--search"
  ]
  grid = points(f, roofline.device_count(topology), config)
  print(
    f"searching {len(grid)} plans for {topology}, {f.search_workers} at a time, {f.search_timeout} s each at most",
    flush=True,
  )
  results = []
  with concurrent.futures.ThreadPoolExecutor(f.search_workers) as pool:
    for result in pool.map(lambda p: _run_point(base, *p, f.search_timeout), grid):
      results.append(result)
      if f.json and f.json != "-":  # after every point: a search stopped midway keeps the points it planned
        with open(f.json, "w") as fh:
          json.dump(results, fh, indent=1)
  if f.json == "-":
    print(json.dumps(results, indent=1))
  else:
    report(results)
  return results


def ranked(results):
  """The plans that fit, fastest overlapped roofline step first. Equal overlapped times (compute-bound points)
  rank the one with less communication first: it needs less of the overlap the roofline assumes."""
  return sorted(
    (r for r in results if r.get("fits")), key=lambda r: (r["roofline"]["overlapped_s"], r["roofline"]["serial_s"])
  )


def report(results):
  """Prints the plans that fit, fastest roofline first, then those that did not fit or failed."""
  for rank, r in enumerate(ranked(results), 1):
    line = r["roofline"]
    print(
      f"{rank:>2}. {r['mesh']:<28} step {line['overlapped_s'] * 1e3:9.4g} ms  MFU {line['overlapped_mfu']:4.0%}"
      f"  {r['total_bytes'] / 2**30:6.2f} GiB/chip  --mesh={r['mesh']} {' '.join(r['overrides'])}"
    )
  for r in results:
    if not r.get("fits"):
      why = r.get("error") or f"needs {r['total_bytes'] / 2**30:.2f} GiB per chip"
      print(
        f" -  {r['mesh']:<28} {'does not fit' if r.get('fits') is False else 'failed'}: {why}  "
        f"({' '.join(r['overrides'])})"
      )
