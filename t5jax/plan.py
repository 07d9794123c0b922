r"""Plans a run at scale on paper: compiles the train step for N fake CPU devices without running it.

  python -m t5jax.plan --config=configs/base.py:t5.1.1-xl --devices=64 --mesh=data=1,fsdp=64 \
      [--config.batch_size=256 --config.data.inputs_length=512 --config.model.scan_layers=True]

Prints, per device, the bytes of params and optimizer state (from their shardings), XLA's memory analysis of
the compiled step (arguments, outputs, temporaries: the activations and gradients live there), and the
FLOPs of one step from XLA's cost analysis. Nothing is allocated: the state and batch are abstract.
"""

import math
import sys

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from t5jax import optim
from t5jax import parallel
from t5jax.data.span_corruption import compute_input_and_target_lengths
from t5jax.model import T5, T5Config, count_params, param_axes
from t5jax.steps import make_init_state, make_train_step

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, e.g. configs/base.py:t5.1.1-xl.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Number of (fake CPU) devices to plan for.")
_MESH = flags.DEFINE_string("mesh", "", "Mesh axes, e.g. data=1,fsdp=64 (default: config.mesh).")


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
  model_config = T5Config.from_dict(config.model.to_dict()).validate()
  mesh = parallel.make_mesh(mesh_sizes)
  parallel.activate(mesh)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  abstract = jax.eval_shape(make_init_state(model_config, tx), jax.random.PRNGKey(0))
  params_sharding = parallel.param_shardings(mesh, param_axes(model_config))
  state_sharding = parallel.state_shardings(mesh, tx, abstract, params_sharding)
  batch_sharding = parallel.batch_sharding(mesh, config.batch_size)
  _, targets_length = compute_input_and_target_lengths(
      config.data.inputs_length, config.data.noise_density, config.data.mean_noise_span_length)
  tokens = lambda n: jax.ShapeDtypeStruct((config.batch_size, n), np.int32)  # noqa: E731
  batch = {"encoder_input_tokens": tokens(config.data.inputs_length), "decoder_input_tokens": tokens(targets_length),
           "decoder_target_tokens": tokens(targets_length), "decoder_loss_weights": tokens(targets_length)}
  step = make_train_step(T5(model_config), tx, schedule, config)
  metrics_sharding = parallel.replicated(mesh, jax.eval_shape(step, abstract, batch)[1])
  compiled = jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                     out_shardings=(state_sharding, metrics_sharding), donate_argnums=0).lower(
                         abstract, batch).compile()
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {
      "params": count_params(model_config),
      "mesh": dict(mesh.shape),
      "param_bytes": _sharded_bytes(abstract["params"], state_sharding["params"]),
      "opt_bytes": _sharded_bytes(abstract["opt_state"], state_sharding["opt_state"]),
      "argument_bytes": memory.argument_size_in_bytes,
      "output_bytes": memory.output_size_in_bytes,
      "temp_bytes": memory.temp_size_in_bytes,
      "flops_per_device": float(cost.get("flops", float("nan"))),
      "tokens_per_step": config.batch_size * (config.data.inputs_length + targets_length),
  }


def _bytes(n):
  return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Before anything asks JAX for devices: this process gets N host devices to compile for.
  jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  config = _CONFIG.value
  try:
    result = plan(config, parse_mesh(_MESH.value) or config.mesh.to_dict())
  except ValueError as e:
    print(f"t5jax.plan: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"{result['params'] / 1e6:,.1f}M params | mesh {result['mesh']} | batch {config.batch_size} x "
        f"{config.data.inputs_length} | {result['tokens_per_step']:,} tokens per step")
  print(f"per device: params {_bytes(result['param_bytes'])} | optimizer state {_bytes(result['opt_bytes'])} | "
        f"step arguments {_bytes(result['argument_bytes'])} | temporaries (activations, grads) "
        f"{_bytes(result['temp_bytes'])} | outputs {_bytes(result['output_bytes'])}")
  print(f"per step: {result['flops_per_device']:.3e} FLOPs per device, "
        f"{result['flops_per_device'] * _DEVICES.value:.3e} in all")
  if config.model.scan_layers:
    print("note: with scan_layers, XLA's cost analysis counts each stack's loop body once, so the FLOPs above "
          "cover one layer per stack; plan with --config.model.scan_layers=False for a step's FLOPs")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
