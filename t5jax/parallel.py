"""Devices: the mesh, the logical-axis rules, shardings for the state and batches, and multi-host set-up.

This is the room that builds meshes and shardings. The model annotates params and activations with logical
axis names ('batch', 'embed', 'mlp', ...); `model/partitioning.py`'s `AXIS_RULES`, the one table, maps them onto
the mesh axes (data, fsdp, tensor, expert).
"""

import contextlib
import math
import os
import socket
import time

import flax.linen as nn
import jax
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from t5jax.model.partitioning import AXIS_RULES, BATCH_AXES, MESH_AXES


def mesh_shape(mesh_config, num_devices):
  """Axis sizes from e.g. {data: -1, fsdp: 2}: one -1 takes the devices left over; unnamed axes are 1."""
  sizes = dict(mesh_config)
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"unknown mesh axis {unknown[0]!r} in config.mesh; the axes are {MESH_AXES}")
  sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh has -1 for {free}; at most one axis can take the remaining devices")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if any(s == 0 or s < -1 for s in sizes.values()):
    raise ValueError(f"config.mesh sizes must be positive or -1, got {sizes}")
  if free:
    if num_devices % fixed:
      raise ValueError(f"config.mesh {sizes}: {num_devices} devices do not divide by the fixed axes ({fixed})")
    sizes[free[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"config.mesh {sizes} has {math.prod(sizes.values())} devices but there are {num_devices}")
  return sizes


def make_mesh(mesh_config, devices=None):
  """A `jax.sharding.Mesh` with axes (data, fsdp, tensor, expert) over all (or the given) devices.

  Axes are Auto: the logical annotations pin params, batches and block boundaries, and XLA's sharding
  propagation fills in the rest, as in T5X.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(mesh_config, len(devices))
  # jax.make_mesh lays the axes out along the physical topology (ICI rings on TPU) where JAX knows it.
  return jax.make_mesh(
    tuple(sizes[a] for a in MESH_AXES),
    MESH_AXES,
    axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    devices=devices,
  )


@contextlib.contextmanager
def use_mesh(mesh, mode="jit"):
  """The mesh that jitted code traced inside this block sees, and (mode 'jit') the logical-axis rules that
  turn the model's activation annotations into sharding constraints on it. Each entry point (train, plan,
  evaluate, a benchmark, a test) enters it once around building and running its steps.

  mode 'pmap': per-device code inside shard_map has no mesh axes to constrain, so no rules then.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(AXIS_RULES if mode == "jit" else ()):
    yield mesh


def param_shardings(mesh, logical_specs):
  """NamedShardings for a pytree of logical PartitionSpecs (from `t5jax.model.param_axes`)."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, AXIS_RULES)


def _opt_leaf_sharding(mesh, leaf, param_sharding, param):
  """An optimizer-state leaf's sharding, from the param it belongs to.

  Same shape as the param (Adam's moments): the param's sharding. One dimension fewer (Adafactor's factored
  row / column statistics): the param's spec with that dimension removed. Anything else: replicated.
  """
  spec = tuple(param_sharding.spec) + (None,) * (param.ndim - len(param_sharding.spec))
  if leaf.shape == param.shape:
    return param_sharding
  if leaf.ndim == param.ndim - 1:
    for dropped in range(param.ndim):
      if leaf.shape == param.shape[:dropped] + param.shape[dropped + 1 :]:
        return NamedSharding(mesh, P(*(spec[:dropped] + spec[dropped + 1 :])))
  return NamedSharding(mesh, P())


def state_shardings(mesh, tx, abstract_state, params_sharding):
  """Shardings for the train state {params, opt_state, step, rng}: params as given, optimizer statistics
  following their params, scalars replicated."""
  replicated = NamedSharding(mesh, P())
  params = abstract_state["params"]
  shardings = {}

  def trace(_):
    # optax.tree_map_params calls tx.init to find the params inside the state; under eval_shape that init
    # is abstract, so nothing concrete is created (a mesh of absent devices may be active).
    shardings["opt_state"] = optax.tree_map_params(
      tx,
      lambda leaf, sharding, param: _opt_leaf_sharding(mesh, leaf, sharding, param),
      abstract_state["opt_state"],
      params_sharding,
      params,
      transform_non_params=lambda _: replicated,
    )
    return 0

  jax.eval_shape(trace, 0)
  return {"params": params_sharding, "opt_state": shardings["opt_state"], "step": replicated, "rng": replicated}


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs carrying shardings: where a checkpoint restore should place each array."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def batch_sharding(mesh, global_batch_size):
  """Batches are split over (data, fsdp) on their leading axis."""
  check_batch_size(mesh.shape, global_batch_size)
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(mesh_sizes, global_batch_size):
  shards = mesh_sizes["data"] * mesh_sizes["fsdp"]
  if global_batch_size % shards:
    raise ValueError(f"config.batch_size={global_batch_size} is not divisible by data x fsdp = {shards}")


def replicated(mesh, tree):
  """The same NamedSharding, a full copy on every device, for each leaf of `tree`."""
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


def data_parallel(per_device_step, mesh, num_args=0):
  """Classic pmap-style data parallelism through `jax.shard_map` (JAX's successor to pmap).

  `per_device_step(state, batch, *args)` sees a full copy of the state (and of `num_args` more arguments: a
  LoRA run's frozen base) and its device's slice of the batch, and must all-reduce its gradients itself (see
  `steps.make_train_step(data_axes=BATCH_AXES)`). Only a pure data mesh makes sense here: params are
  replicated, not sharded.
  """
  if mesh.shape["tensor"] * mesh.shape["expert"] != 1:
    raise ValueError(f"parallel.mode='pmap' replicates params; use a data-only mesh, not {dict(mesh.shape)}")
  # check_vma=False: JAX would otherwise psum the gradients of the replicated params by itself, and the
  # explicit all-reduce in the step is the point of this mode.
  in_specs = (P(), P(BATCH_AXES)) + (P(),) * num_args
  return jax.shard_map(per_device_step, mesh=mesh, in_specs=in_specs, out_specs=(P(), P()), check_vma=False)


def host_to_global(batch, sharding):
  """Per-host numpy batch (this process's rows) -> global jax.Arrays laid out by `sharding`."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def initialize_distributed(
  coordinator_address=None, num_processes=None, process_id=None, *, timeout_s=300, heartbeat_s=30
):
  """Joins a multi-process run before anything touches the devices.

  Explicit: a coordinator address, process count and id (flags, or the T5JAX_COORDINATOR_ADDRESS,
  T5JAX_NUM_PROCESSES and T5JAX_PROCESS_ID variables that `launch.sh multiprocess` sets). Automatic: on a
  TPU VM pod (T5JAX_DISTRIBUTED=auto) or inside a Slurm job step with several tasks, JAX finds its peers
  itself. Otherwise a single process. CPU processes talk through gloo. A peer silent for `heartbeat_s` seconds (it died) makes
  the others exit with an error rather than hang in a collective.
  """
  env = os.environ
  coordinator_address = coordinator_address or env.get("T5JAX_COORDINATOR_ADDRESS")
  num_processes = num_processes or int(env.get("T5JAX_NUM_PROCESSES", 0)) or None
  if process_id is None and "T5JAX_PROCESS_ID" in env:
    process_id = int(env["T5JAX_PROCESS_ID"])
  explicit = coordinator_address is not None
  # T5JAX_DISTRIBUTED=auto (set by `launch.sh tpu-pod`) or a multi-task Slurm step: JAX detects the cluster.
  auto = env.get("T5JAX_DISTRIBUTED") == "auto" or (int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env)
  if not (explicit or auto):
    return
  if explicit and (num_processes is None or process_id is None):
    raise ValueError("a coordinator address needs --num_processes and --process_id too")
  if explicit and process_id != 0:
    _wait_for_coordinator(coordinator_address, num_processes, process_id, timeout_s)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
      coordinator_address,
      num_processes,
      process_id,
      initialization_timeout=timeout_s,
      heartbeat_timeout_seconds=heartbeat_s,
    )
  except Exception as e:  # the runtime's errors are long and nested; the address is what the user needs
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConnectionError(
      f"could not join the run at coordinator {coordinator_address or '(auto)'} within "
      f"{timeout_s}s as process {process_id} of {num_processes}: {first_line}"
    ) from None


def _wait_for_coordinator(address, num_processes, process_id, timeout_s):
  """Polls the coordinator's port: the runtime aborts the whole process when it cannot connect, so an
  unreachable coordinator is caught here first and reported as an error naming it."""
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise ConnectionError(
          f"could not join the run at coordinator {address} within {timeout_s}s as process "
          f"{process_id} of {num_processes}: {e}"
        ) from None
      time.sleep(0.5)
