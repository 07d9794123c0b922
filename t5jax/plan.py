r"""Plans a run at scale on paper: compiles the train step for a TPU pod, or for N fake CPU devices, without
running it.

  python -m t5jax.plan --config=configs/base.py:t5.1.1-xl --topology=v5e:4x4 --mesh=data=4,fsdp=4 \
      --config.model.scan_layers=True [--json=plan.json] [--search]
  python -m t5jax.plan --config=configs/base.py:t5.1.1-xl --devices=64 --mesh=data=1,fsdp=64 \
      [--config.batch_size=256 --config.data.inputs_length=512 --config.model.scan_layers=True]

With --topology (needs `pip install -e .[tpu-plan]`), the TPU compiler itself reports per-device memory
against the chip's HBM; the step's FLOPs, its collectives and a roofline step time follow (`planning/topology.py`,
`planning/roofline.py`); --search ranks meshes, remat policies, microbatches and scan (`planning/search.py`).
--platform=gpu --topology=h100:8 gives an analytic estimate (no GPU compiler here).

Without --topology:
Prints, per device, the bytes of params and optimizer state (from their shardings), XLA's memory analysis of
the compiled step (arguments, outputs, temporaries: the activations and gradients live there), and the
FLOPs of one step from XLA's cost analysis. Nothing is allocated: the run is built by `setup.build`, with
the state abstract and the batch shaped as the configured data pipeline's (`seams.batch_spec`).
"""

import json
import sys

from absl import flags
import jax
from ml_collections import config_flags

from t5jax import cli, parallel, setup
from t5jax.planning import roofline, search, topology
from t5jax.model import count_params


def parse_mesh(text):
  sizes = {}
  for part in filter(None, text.split(",")):
    axis, _, size = part.partition("=")
    if not size.lstrip("-").isdigit():
      raise ValueError(f"--mesh part {part!r} is not axis=size")
    sizes[axis.strip()] = int(size)
  return sizes


def plan(config, mesh_sizes):
  """Returns a dict of per-device memory (bytes) and per-step FLOPs for `config` on the mesh."""
  mesh = parallel.make_mesh(mesh_sizes)
  with parallel.use_mesh(mesh, config.parallel.mode):
    run = setup.build(config, mesh)
    compiled = run.compile_train_step()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  abstract = run.abstract_state
  return {
    "params": count_params(run.model_config),
    "mesh": dict(mesh.shape),
    "param_bytes": topology.sharded_bytes(abstract["params"], run.state_sharding["params"]),
    "opt_bytes": topology.sharded_bytes(abstract["opt_state"], run.state_sharding["opt_state"]),
    "argument_bytes": memory.argument_size_in_bytes,
    "output_bytes": memory.output_size_in_bytes,
    "temp_bytes": memory.temp_size_in_bytes,
    "flops_per_device": float(cost.get("flops", float("nan"))),
    "tokens_per_step": run.tokens_per_batch,
    "batch": {name: tuple(x.shape) for name, x in run.batch_spec.items()},
  }


def _bytes(n):
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _seconds(x):
  return f"{x * 1e3:.1f} ms" if x < 1 else f"{x:.2f} s"


def table(r):
  """The plan of `tpu_plan` as lines of text: memory vs HBM, FLOPs, collectives, roofline, the caveat."""
  chip = r["chip"]
  mesh = " x ".join(f"{a} {n}" for a, n in r["mesh"].items() if n > 1) or "1 device"
  lines = [
    f"{r['params'] / 1e6:,.1f}M params | {r['target']}: {r['devices']} x {chip['name']} | mesh {mesh} | "
    f"batch {r['batch_size']} ({r['tokens_per_step']:,} tokens) | scan_layers={r['scan_layers']} "
    f"remat={r['remat_policy']} microbatches={r['grad_accum_steps']} | {r['source']}"
    + (f", compiled in {r['compile_s']:.0f} s" if "compile_s" in r else "")
    + (" (figures kept from then: --plan_cache)" if r.get("cached") else "")
  ]
  if "param_bytes" in r:
    rows = [
      ("params" if "frozen_bytes" not in r else "LoRA adapters", "param_bytes"),
      ("optimizer state", "opt_bytes"),
      ("frozen base", "frozen_bytes"),
      ("merged weights", "merged_bytes"),
      ("activations / temporaries", "temp_bytes"),
      ("generated code", "code_bytes"),
      ("batch, grads out, other", "other_bytes"),
    ]
    lines += [f"  {label:<28}{_bytes(r[key]):>12}" for label, key in rows if key in r]
  hbm = chip["hbm_bytes"]
  verdict = {True: f"fits, {_bytes(hbm - r['total_bytes'])} left", False: "DOES NOT FIT", None: "compile failed"}
  if r.get("total_bytes", float("nan")) == r.get("total_bytes"):  # not NaN: the compiler gave a figure
    lines.append(
      f"  {'total per device':<28}{_bytes(r['total_bytes']):>12} of {hbm / 1e9:.1f} GB HBM "
      f"({r['total_bytes'] / hbm:.0%}): {verdict[r['fits']]}"
    )
  if "error" in r:
    lines.append(f"  compile: {r['error']}")
  remat = r["flops_per_device"] / r["model_flops_per_device"]
  lines.append(
    f"FLOPs per step per device: {r['flops_per_device']:.3e} (model {r['model_flops_per_device']:.3e}"
    f", x{remat:.2f} with remat recompute)"
  )
  for kind, c in r.get("collectives", {}).items():
    lines.append(f"  {kind:<20}{c['count']:>6} per step {_bytes(c['bytes']):>12}  ~{_seconds(c['seconds'])}")
  if "roofline" in r:
    f = r["roofline"]
    lines.append(
      f"roofline step: compute {_seconds(f['compute_s'])} | communication {_seconds(f['comm_s'])} | "
      f"overlapped {_seconds(f['overlapped_s'])} ({f['overlapped_tokens_per_s']:,.0f} tokens/s, MFU "
      f"{f['overlapped_mfu']:.0%}) | serial {_seconds(f['serial_s'])} "
      f"({f['serial_tokens_per_s']:,.0f} tokens/s, MFU {f['serial_mfu']:.0%})"
    )
  lines.append(
    f"note: {r['note']}"
    + ("; communication is not estimated here (analytic plan)" if r["source"] == "analytic" else "")
  )
  return lines


def _define_flags():
  """The CLI's flags, defined only when run as a program: every CLI has its own --config."""
  config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/base.py:t5.1.1-xl.")
  flags.DEFINE_integer("devices", 8, "Number of (fake CPU) devices to plan for (without --topology).")
  flags.DEFINE_string("mesh", "", "Mesh axes, e.g. data=1,fsdp=64 (default: config.mesh).")
  flags.DEFINE_string(
    "topology",
    None,
    "A TPU topology to compile for, e.g. v5e:4x4, v5p:2x4x4, v4:2x2x2, "
    "v6e:4x4; with --platform=gpu a GPU count, e.g. h100:8.",
  )
  flags.DEFINE_enum("platform", "tpu", ["tpu", "gpu"], "tpu: the TPU compiler's figures; gpu: analytic.")
  flags.DEFINE_string("json", None, "Also write the plan as JSON to this file ('-': stdout only, as JSON).")
  flags.DEFINE_string("hlo", None, "With --topology: write the compiled step's HLO text to this file.")
  flags.DEFINE_string(
    "plan_cache",
    "~/.cache/t5jax/plan",
    "With --topology: where the compiler's figures for "
    "each program compiled are kept, so that planning it again takes seconds ('' to not keep).",
  )
  search.define_flags()


def _target_plan(config, mesh_sizes):
  f = flags.FLAGS
  if f.platform == "gpu":
    return topology.plan_analytic(config, mesh_sizes, f.topology, jax.devices("cpu"))
  return topology.plan_topology(config, mesh_sizes, f.topology, f.hlo, f.plan_cache or None)


def _write_json(result):
  if flags.FLAGS.json == "-":
    print(json.dumps(result, indent=1))
  elif flags.FLAGS.json:
    with open(flags.FLAGS.json, "w") as fh:
      json.dump(result, fh, indent=1)


def main(argv):
  cli.check_args(argv)
  f = flags.FLAGS
  config = f.config
  mesh_sizes = parse_mesh(f.mesh) or config.mesh.to_dict()
  if f.platform == "gpu" and not f.topology:
    raise ValueError("--platform=gpu plans for --topology=CHIP:N, e.g. h100:8 or a100:8")
  if f.topology and f.search:
    return search.search(sys.argv, f.topology)
  if f.topology:
    if f.platform == "gpu":  # an analytic plan shards over N host devices standing in for the GPUs
      jax.config.update("jax_num_cpu_devices", roofline.device_count(f.topology))
    result = _target_plan(config, mesh_sizes)
    _write_json(result)
    if result.get("fits") is None:
      raise ValueError(f"the train step did not compile for {f.topology}: {result['error']}")
    if f.json != "-":
      print("\n".join(table(result)))
    return None
  _host_plan(config, mesh_sizes)


def _host_plan(config, mesh_sizes):
  """The plan for N fake CPU devices: XLA:CPU's figures, printed as they always were."""
  devices = flags.FLAGS.devices
  # Before anything asks JAX for devices: this process gets N host devices to compile for.
  jax.config.update("jax_num_cpu_devices", devices)
  result = plan(config, mesh_sizes)
  batch = result["batch"]
  encoder = batch.get("encoder_input_tokens", batch.get("frames"))  # video: uint8 clips [B, T, H, W, 3]
  decoder = batch["decoder_target_tokens"]
  print(
    f"{result['params'] / 1e6:,.1f}M params | mesh {result['mesh']} | batch {encoder[0]} x "
    f"{' x '.join(map(str, encoder[1:]))} "
    f"inputs / {decoder[1]} targets ({config.data.kind}) | {result['tokens_per_step']:,} tokens per step"
  )
  print(
    f"per device: params {_bytes(result['param_bytes'])} | optimizer state {_bytes(result['opt_bytes'])} | "
    f"step arguments {_bytes(result['argument_bytes'])} | temporaries (activations, grads) "
    f"{_bytes(result['temp_bytes'])} | outputs {_bytes(result['output_bytes'])}"
  )
  print(
    f"per step: {result['flops_per_device']:.3e} FLOPs per device, {result['flops_per_device'] * devices:.3e} in all"
  )
  if config.model.scan_layers:
    print(
      "note: with scan_layers, XLA's cost analysis counts each stack's loop body once, so the FLOPs above "
      "cover one layer per stack; plan with --config.model.scan_layers=False for a step's FLOPs"
    )


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  cli.run(main, "t5jax.plan")
