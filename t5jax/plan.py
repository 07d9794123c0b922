r"""Plans a run at scale on paper: compiles the train step for N fake CPU devices without running it.

  python -m t5jax.plan --config=configs/base.py:t5.1.1-xl --devices=64 --mesh=data=1,fsdp=64 \
      [--config.batch_size=256 --config.data.inputs_length=512 --config.model.scan_layers=True]

Prints, per device, the bytes of params and optimizer state (from their shardings), XLA's memory analysis of
the compiled step (arguments, outputs, temporaries: the activations and gradients live there), and the
FLOPs of one step from XLA's cost analysis. Nothing is allocated: the run is built by `setup.build`, with
the state abstract and the batch shaped as the configured data pipeline's (`data/specs.py`).
"""

import math

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from t5jax import cli, parallel, setup
from t5jax.model import count_params


def parse_mesh(text):
  sizes = {}
  for part in filter(None, text.split(",")):
    axis, _, size = part.partition("=")
    if not size.lstrip("-").isdigit():
      raise ValueError(f"--mesh part {part!r} is not axis=size")
    sizes[axis.strip()] = int(size)
  return sizes


def _sharded_bytes(abstract, shardings):
  """Bytes one device holds of each leaf, summed: a leaf's shard shape comes from its sharding."""
  return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
             for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)))


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
      "param_bytes": _sharded_bytes(abstract["params"], run.state_sharding["params"]),
      "opt_bytes": _sharded_bytes(abstract["opt_state"], run.state_sharding["opt_state"]),
      "argument_bytes": memory.argument_size_in_bytes,
      "output_bytes": memory.output_size_in_bytes,
      "temp_bytes": memory.temp_size_in_bytes,
      "flops_per_device": float(cost.get("flops", float("nan"))),
      "tokens_per_step": run.tokens_per_batch,
      "batch": {name: tuple(x.shape) for name, x in run.batch_spec.items()},
  }


def _bytes(n):
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _define_flags():
  """The CLI's flags, defined only when run as a program: every CLI has its own --config."""
  config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/base.py:t5.1.1-xl.")
  flags.DEFINE_integer("devices", 8, "Number of (fake CPU) devices to plan for.")
  flags.DEFINE_string("mesh", "", "Mesh axes, e.g. data=1,fsdp=64 (default: config.mesh).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Before anything asks JAX for devices: this process gets N host devices to compile for.
  jax.config.update("jax_num_cpu_devices", flags.FLAGS.devices)
  config = flags.FLAGS.config
  result = plan(config, parse_mesh(flags.FLAGS.mesh) or config.mesh.to_dict())
  batch = result["batch"]
  encoder = batch.get("encoder_input_tokens", batch.get("frames"))   # video: uint8 clips [B, T, H, W, 3]
  decoder = batch["decoder_target_tokens"]
  print(f"{result['params'] / 1e6:,.1f}M params | mesh {result['mesh']} | batch {encoder[0]} x "
        f"{' x '.join(map(str, encoder[1:]))} "
        f"inputs / {decoder[1]} targets ({config.data.kind}) | {result['tokens_per_step']:,} tokens per step")
  print(f"per device: params {_bytes(result['param_bytes'])} | optimizer state {_bytes(result['opt_bytes'])} | "
        f"step arguments {_bytes(result['argument_bytes'])} | temporaries (activations, grads) "
        f"{_bytes(result['temp_bytes'])} | outputs {_bytes(result['output_bytes'])}")
  print(f"per step: {result['flops_per_device']:.3e} FLOPs per device, "
        f"{result['flops_per_device'] * flags.FLAGS.devices:.3e} in all")
  if config.model.scan_layers:
    print("note: with scan_layers, XLA's cost analysis counts each stack's loop body once, so the FLOPs above "
          "cover one layer per stack; plan with --config.model.scan_layers=False for a step's FLOPs")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  cli.run(main, "t5jax.plan")
