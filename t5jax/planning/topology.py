"""Plans a run for an accelerator this machine does not have: the TPU compiler's memory for a real topology,
FLOPs and collectives of the compiled step, and a roofline; or an analytic estimate for GPUs.

The TPU side needs libtpu (`pip install -e .[tpu-plan]`), which carries the TPU compiler: with it,
`jax.experimental.topologies` describes a pod's devices and the train step compiles for them on a CPU host.
"""

import dataclasses
import gzip
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import time

import jax
from flax import traverse_util

from t5jax import parallel, seams, setup
from t5jax.planning import roofline
from t5jax.data import specs
from t5jax.model import T5Config, count_params

INSTALL_HINT = "planning for TPUs needs libtpu: pip install -e '.[tpu-plan]' (libtpu==0.0.42.1)"
ESTIMATE_NOTE = (
  "estimates, not measurements: the compiler's memory and FLOPs with a roofline time that assumes "
  "peak bf16 FLOP/s and ring collectives at full ICI bandwidth; it leaves out HBM-bandwidth-bound "
  "ops, kernel launch and host input time, collective latency, DCN between slices and "
  "imperfect overlap"
)


def topology_devices(name):
  """The devices of a TPU topology such as 'v5e:4x4' or 'v5p:2x4x4', from the TPU compiler's own description."""
  roofline.chip(name)
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError(INSTALL_HINT)
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server to ask: this is not a TPU VM
  # libtpu locks /tmp/libtpu_lockfile so that one process owns the TPU chips; a plan only compiles, so several
  # plans (a search's workers, test processes) may load it at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies

  try:
    return topologies.get_topology_desc(topology_name=name, platform="tpu").devices
  except Exception as e:  # noqa: BLE001  (the runtime's errors are long; the name is what the user needs)
    raise ValueError(f"--topology={name}: libtpu could not describe it ({_first_line(e)})") from None


def _first_line(e):
  lines = [line.strip() for line in str(e).splitlines() if line.strip()]
  return lines[0] if lines else type(e).__name__


def sharded_bytes(abstract, shardings):
  """Bytes one device holds of each leaf, summed: a leaf's shard shape comes from its sharding."""
  return sum(
    math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
    for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True)
  )


def twin_flops(config):
  """(step FLOPs, model FLOPs) of the whole global batch, from XLA's cost analysis of the step lowered (traced,
  not compiled) on one CPU device with layers unrolled and one microbatch: XLA counts a loop body once, so a
  scanned or accumulated step's compiled count covers one layer / microbatch. Step FLOPs include the
  recomputation the remat policy asks for; model FLOPs are those without remat (what MFU counts).

  A step's FLOPs are linear in each stack's depth (its layers are alike; the position bias and embeddings
  are per stack), so three shallow twins (1 + 1, 2 + 1 and 1 + 2 blocks of layers) give them exactly: tracing
  a 48-layer model unrolled takes minutes on a CPU, tracing 3 layers seconds."""
  model = T5Config.from_dict(config.model.to_dict())
  blocks = {s: model.scan_block(s) for s in ("encoder", "decoder")}
  depth = {
    "encoder": model.num_encoder_layers // blocks["encoder"],
    "decoder": model.num_decoder_layers // blocks["decoder"],
  }
  results = []
  for remat in dict.fromkeys((config.model.remat_policy, "none")):
    one, two_enc, two_dec = (
      _lowered_flops(config, remat, blocks["encoder"] * e, blocks["decoder"] * d) for e, d in ((1, 1), (2, 1), (1, 2))
    )
    results.append(one + (depth["encoder"] - 1) * (two_enc - one) + (depth["decoder"] - 1) * (two_dec - one))
  return results[0], results[-1]


def _lowered_flops(config, remat, encoder_layers, decoder_layers):
  """XLA's FLOPs of the step with this remat and depth, unrolled, one microbatch, traced on one CPU device."""
  twin = config.copy_and_resolve_references()
  twin.model.update(
    scan_layers=False, remat_policy=remat, num_encoder_layers=encoder_layers, num_decoder_layers=decoder_layers
  )
  twin.grad_accum_steps = 1
  twin.mesh.update(data=1, fsdp=1, tensor=1, expert=1)
  mesh = parallel.make_mesh(twin.mesh, jax.devices("cpu")[:1])
  with parallel.use_mesh(mesh, twin.parallel.mode):
    run = setup.build(twin, mesh)
    return float(run.lower_train_step().cost_analysis()["flops"])


def plan_topology(config, mesh_sizes, topology, hlo_path=None, cache_dir=None):
  """Compiles the configured train step for `topology` and returns the plan's figures (see `describe`).
  With `cache_dir`, a program compiled there before for this topology is not compiled again."""
  devices = topology_devices(topology)
  spec = roofline.per_device(roofline.chip(topology), len(devices) // roofline.device_count(topology))
  try:
    mesh = parallel.make_mesh(mesh_sizes, devices)
  except ValueError as e:
    raise ValueError(f"--mesh for --topology={topology} ({len(devices)} devices): {e}") from None
  result = _base_result(config, mesh, topology, spec, "tpu compiler")
  start = time.time()
  with parallel.use_mesh(mesh, config.parallel.mode):
    run = setup.build(config, mesh)
    lowered = run.lower_train_step()
    result["build_lower_s"] = time.time() - start
    try:
      compiled = compile_cached(lowered, mesh, topology, cache_dir)
    except Exception as e:  # noqa: BLE001  (XLA errors are long; a plan reports their first line)
      result.update(compile_s=time.time() - start - result["build_lower_s"], **_compile_failure(e, spec))
      return result
  result.update(compile_s=compiled["compile_s"], cached=compiled["cached"])
  memory = compiled["memory"]
  result.update(state_bytes(run))  # the step's in_shardings, which the compiled program takes its state in
  result["temp_bytes"] = memory["temp_size_in_bytes"]
  result["code_bytes"] = memory["generated_code_size_in_bytes"]
  result["total_bytes"] = (
    memory["argument_size_in_bytes"]
    + memory["output_size_in_bytes"]
    - memory["alias_size_in_bytes"]
    + memory["temp_size_in_bytes"]
    + memory["generated_code_size_in_bytes"]
  )
  result["other_bytes"] = result["total_bytes"] - sum(
    result.get(k, 0) for k in ("param_bytes", "opt_bytes", "frozen_bytes", "temp_bytes", "code_bytes")
  )
  result["fits"] = result["total_bytes"] <= spec.hbm_bytes
  hlo = compiled["hlo"]
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(hlo)
  start = time.time()
  found = roofline.collectives(hlo, len(devices))
  comm_s = roofline.comm_seconds(found, list(mesh.devices.flat), spec)
  result["collectives"] = roofline.summarize_collectives(found)
  result["roofline"] = roofline.roofline(
    result["flops_per_device"], result["model_flops_per_device"], comm_s, result["tokens_per_step"], spec
  )
  result["hlo_parse_s"] = time.time() - start
  return result


_MEMORY = (
  "argument_size_in_bytes",
  "output_size_in_bytes",
  "alias_size_in_bytes",
  "temp_size_in_bytes",
  "generated_code_size_in_bytes",
)


def compile_cached(lowered, mesh, topology, cache_dir=None):
  """{memory: the compiler's memory analysis, hlo: the compiled program's text, compile_s, cached} of the
  lowered step compiled for `topology`. The TPU compiler's code generation is nearly all of a plan's time
  (minutes on a CPU host), and JAX's own compilation cache cannot serve it (a compile-only TPU client cannot
  load an executable back), so `cache_dir` keeps these figures, keyed by everything the compile sees: the
  lowered program, the devices it is laid out over, the topology and the JAX and libtpu versions."""
  key = "\n".join(
    [
      topology,
      jax.__version__,
      importlib.metadata.version("libtpu"),
      ",".join(str(d.id) for d in mesh.devices.flat),
      lowered.as_text(),
    ]
  )
  path = cache_dir and os.path.join(
    os.path.expanduser(cache_dir), hashlib.sha256(key.encode()).hexdigest() + ".json.gz"
  )
  if path and os.path.exists(path):
    with gzip.open(path, "rt") as f:
      return {**json.load(f), "cached": True}
  start = time.time()
  compiled = lowered.compile()
  memory = compiled.memory_analysis()
  entry = {
    "memory": {name: getattr(memory, name) for name in _MEMORY},
    "hlo": compiled.as_text(),
    "compile_s": time.time() - start,
  }
  if path:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path + ".tmp", "wt") as f:  # then renamed: a reader never sees half an entry
      json.dump(entry, f)
    os.replace(path + ".tmp", path)
  return {**entry, "cached": False}


def _base_result(config, mesh, target, spec, source):
  """What every plan reports whatever its source: the run's shape, the chip and the step's FLOPs."""
  n = mesh.devices.size
  start = time.time()
  flops, model_flops = twin_flops(config)
  batch = seams.batch_spec(config)
  tokens = sum(batch[k][0][0] * batch[k][0][1] for k in ("encoder_input_tokens", "decoder_target_tokens") if k in batch)
  return {
    "target": target,
    "chip": dataclasses.asdict(spec),
    "source": source,
    "mesh": dict(mesh.shape),
    "devices": n,
    "params": count_params(T5Config.from_dict(config.model.to_dict())),
    "batch_size": config.batch_size,
    "tokens_per_step": tokens,
    "remat_policy": config.model.remat_policy,
    "scan_layers": config.model.scan_layers,
    "grad_accum_steps": config.grad_accum_steps,
    "flops_per_device": flops / n,
    "model_flops_per_device": model_flops / n,
    "flops_trace_s": time.time() - start,
    "note": ESTIMATE_NOTE,
  }


def _compile_failure(e, spec):
  """A compile that ran out of HBM is a plan that does not fit (with the compiler's figure); anything else is
  an error, reported as its first line."""
  text = str(e)
  if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text:
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    used = re.search(r"Used ([\d.]+)([KMGT])i?B? of ([\d.]+)([KMGT])i?B? hbm", text)
    total = float(used.group(1)) * scale[used.group(2)] if used else float("nan")
    # Or the compiler stopped early, at the temporaries alone: then the total is not known, only more.
    temps = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", text)
    return {
      "fits": False,
      "total_bytes": total,
      "error": _first_line(e),
      **({"temp_bytes": float(temps.group(1)) * scale[temps.group(2)]} if temps else {}),
    }
  return {"fits": None, "error": _first_line(e)}


def plan_analytic(config, mesh_sizes, target, devices):
  """An estimate for a GPU (or any chip) with no compiler for it here: params and optimizer state per device
  from their shardings, activations from a formula, FLOPs from the lowered step; compute-only roofline."""
  spec = roofline.chip(target)
  try:
    mesh = parallel.make_mesh(mesh_sizes, devices)
  except ValueError as e:
    raise ValueError(f"--mesh for {target} ({len(devices)} devices): {e}") from None
  result = _base_result(config, mesh, target, spec, "analytic")
  with parallel.use_mesh(mesh, config.parallel.mode):
    run = setup.build(config, mesh)
  result.update(state_bytes(run, merged=True))
  result["temp_bytes"] = activation_bytes(config, dict(mesh.shape))
  # Params and their gradients, the optimizer state, activations; a LoRA run adds its frozen base and the
  # float32 merged weights the model applies (kept for the backward pass).
  result["total_bytes"] = (
    2 * result["param_bytes"]
    + result["opt_bytes"]
    + result["temp_bytes"]
    + result.get("frozen_bytes", 0)
    + result.get("merged_bytes", 0)
  )
  result["fits"] = result["total_bytes"] <= spec.hbm_bytes
  result["roofline"] = roofline.roofline(
    result["flops_per_device"], result["model_flops_per_device"], 0.0, result["tokens_per_step"], spec
  )
  return result


def state_bytes(run, merged=False):
  """Per-device bytes of the trained params and their optimizer state and, for a LoRA run, of the frozen base
  (as held) and, with `merged`, of the weights merged from it (a compiled plan counts those among its
  temporaries); with the count of trained params."""
  result = {
    "param_bytes": sharded_bytes(run.abstract_state["params"], run.state_sharding["params"]),
    "opt_bytes": sharded_bytes(run.abstract_state["opt_state"], run.state_sharding["opt_state"]),
    "trained_params": sum(math.prod(x.shape) for x in jax.tree.leaves(run.abstract_state["params"])),
  }
  if run.lora is not None:
    result["frozen_bytes"] = sharded_bytes(run.lora.abstract_arg, run.lora.sharding)
  if run.lora is not None and merged:
    weights = jax.eval_shape(run.lora.merge, run.lora.abstract_arg, run.abstract_state["params"])
    weights = traverse_util.flatten_dict(weights)
    held = {k: run.lora.sharding["/".join(k)] for k in weights}
    result["merged_bytes"] = sharded_bytes(weights, {k: getattr(s, "values", s) for k, s in held.items()})
  return result


def activation_bytes(config, mesh):
  """Activations one device keeps for the backward pass, by the per-layer count of Korthikanti et al. 2022
  ("Reducing Activation Recomputation in Large Transformer Models", in 2-byte units: 11sbd + 5as^2b for
  attention, the MLP's inputs and outputs, 4sbd for norms), a cross-attention per decoder layer, and the
  float32 logits. Full remat keeps each layer's input plus one layer's working set; 'dots' is counted as
  'none' (an upper bound). Divided over the batch shards and, roughly, the tensor axis."""
  m, d = config.model, config.data
  s, t = d.inputs_length, specs.targets_length(d)
  b = config.batch_size / (mesh["data"] * mesh["fsdp"] * config.grad_accum_steps)
  mlp = 2 * m.d_model + (6 if m.feed_forward_proj.startswith("gated") else 4) * m.d_ff
  heads = m.num_heads * m.d_kv

  def attention(q, k):
    return 11 * q * b * heads + 5 * m.num_heads * q * k * b

  encoder = attention(s, s) + s * b * (mlp + 4 * m.d_model)
  decoder = attention(t, t) + attention(t, s) + t * b * (mlp + 6 * m.d_model)
  scale = (4 if m.dtype == "float32" else 2) / 2 / mesh["tensor"]
  if m.remat_policy == "full":
    kept = (m.num_encoder_layers * s + m.num_decoder_layers * t) * b * m.d_model * 2 + max(encoder, decoder)
  else:
    kept = m.num_encoder_layers * encoder + m.num_decoder_layers * decoder
  return int(kept * scale + 2 * b * t * m.vocab_size * 4 / mesh["tensor"])
