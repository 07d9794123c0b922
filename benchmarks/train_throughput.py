r"""Training tokens/s of t5jax against transformers' PyTorch T5 at the same shape, each side in its own process.

  python benchmarks/train_throughput.py [--preset=t5.1.1-small | base] [--batch=8] [--rounds=4] [--steps=2]
  python benchmarks/train_throughput.py --paths=accum2,remat,scan [--rounds=3]   # paths against the plain step
  python benchmarks/train_throughput.py --preset=t5.1.1-base --dtype=bfloat16 --batch=64 --quick --out=r.jsonl

Both sides train a random-init model of the preset's shape (float32, inputs 512, targets 114, no dropout) with
AdamW on the same random token batch. Each side runs in a worker process of its own (two thread pools in one
process contend and understate JAX by ~40% here), kept alive across rounds; rounds alternate the sides so
machine noise hits both alike. Prints per round: tokens/s of each side and their ratio; then the medians, the
t5jax forward and forward+backward times, the XLA f32 matmul peak measured in the same run (2048^2, jit), the
CPU MFU (the step's FLOPs as XLA's cost analysis counts them, over step time, over that peak) and the CPU name.
Then PyTorch's own matmul peak and its step read the same way, and the matmul floor: every matmul of t5jax's
forward+backward (found in its jaxpr) timed alone and summed, the time the step would take if nothing between
the matmuls cost anything; PyTorch's step time over that floor is the most any graph change could reach here.

`--paths` compares, per token, the plain jit step with the other ways users train: a mesh of 8 host devices,
pmap mode on 8 devices, gradient accumulation (2 microbatches), full remat, scan_layers and LoRA rank 16
(`lora16`: adapters on every linear layer of a frozen base, against the plain step's full fine-tuning). Each path is a
live worker; the 8-device ones hold 8 replicas of the state (~8 GB at T5.1.1-small), so on a 24 GB machine
run each of them alone (`--paths=mesh8`, `--paths=pmap8`): together they were killed for memory.

On a GPU: `--dtype=bfloat16` computes in bfloat16 on both sides (t5jax's config.model.dtype, PyTorch's autocast;
float32 weights on both), PyTorch runs on CUDA with fused AdamW, and the matmul peak is a plain 8192^3 product
in the step's dtype (benchmarks/devices.py), which MFU is read against. `--quick` skips the forward,
forward+backward and matmul floor timings; `--out FILE` appends each round and the summary as JSON lines.
Needs `torch==2.13.0` and `transformers` (see benchmarks/README.md).
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

import devices
from matmul_floor import matmul_floor, timed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EIGHT_DEVICES = "--xla_force_host_platform_device_count=8"
# name -> (config overrides, host devices): the paths of issue 14, each in its own worker process.
PATHS = {
  "plain": ({}, 1),
  "mesh8": ({"mesh.data": 8}, 8),
  "pmap8": ({"mesh.data": 8, "parallel.mode": "pmap"}, 8),
  "accum2": ({"grad_accum_steps": 2}, 1),
  "remat": ({"model.remat_policy": "full"}, 1),
  "scan": ({"model.scan_layers": True}, 1),
  # LoRA rank 16 on every linear layer of a frozen base (a random one: the step costs the same).
  "lora16": ({"finetune.lora.rank": 16, "init_from": "random"}, 1),
}


def load_base_config(preset):
  spec = importlib.util.spec_from_file_location("base_config", os.path.join(ROOT, "configs", "base.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(None if preset == "base" else preset)  # "base": configs/base.py as it is


def make_batch(batch, inputs_length, targets_length, vocab, seed=0):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(3, vocab, (batch, inputs_length), dtype=np.int32)
  targets = rng.integers(3, vocab, (batch, targets_length), dtype=np.int32)
  decoder_inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
  return {
    "encoder_input_tokens": inputs,
    "decoder_target_tokens": targets,
    "decoder_input_tokens": decoder_inputs,
    "decoder_loss_weights": np.ones_like(targets),
  }


def bench_config(args, overrides=()):
  from t5jax.data import specs

  config = load_base_config(args.preset)
  config.optimizer.update(name="adamw", schedule="constant", learning_rate=1e-4)
  config.batch_size, config.data.inputs_length = args.batch, args.inputs_length
  config.model.dtype = args.dtype
  for key, value in dict(overrides).items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config, specs.targets_length(config.data)


def t5jax_worker(config, batch):
  """Commands for one t5jax process: train steps, forward / forward+backward timing, matmul peak, FLOPs."""
  import jax
  import jax.numpy as jnp

  from flax.traverse_util import flatten_dict

  from t5jax import losses, parallel, setup
  from t5jax.model import init_params

  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh, config.parallel.mode):
    run_setup = setup.build(config, mesh)
    state, step = run_setup.init_state(), run_setup.compile_train_step()
    flops = float(step.cost_analysis().get("flops", float("nan")))
    if run_setup.lora is not None:
      host = flatten_dict(init_params(run_setup.model_config, jax.random.key(0)))
      base = run_setup.lora.to_base({k: np.asarray(v) for k, v in host.items()})
      step = run_setup.with_term_args(step, (jax.device_put(base, run_setup.lora.sharding),))
  device_batch = parallel.host_to_global(batch, run_setup.batch_sharding)

  def loss(params, b):
    args, kwargs = run_setup.model.batch_inputs(b)
    logits = run_setup.model.apply({"params": params}, *args, **kwargs)
    return losses.loss_sums(logits, b["decoder_target_tokens"], b["decoder_loss_weights"])["loss_sum"]

  forward, backward = jax.jit(loss), jax.jit(jax.value_and_grad(loss))

  def train(n):
    nonlocal state
    start = time.perf_counter()
    for _ in range(n):
      state, metrics = step(state, device_batch)
    jax.block_until_ready(metrics)
    return time.perf_counter() - start

  plain_batch = jax.tree.map(jnp.asarray, batch)
  return {
    "train": train,
    "flops": lambda: flops,
    # Best of 3 back-to-back calls: the first after a train step pays for reallocating its buffers.
    "forward": lambda: min(timed(forward, state["params"], plain_batch) for _ in range(3)),
    "backward": lambda: min(timed(backward, state["params"], plain_batch) for _ in range(3)),
    "floor": lambda: matmul_floor(jax.value_and_grad(loss), state["params"], plain_batch),
    "matmul": lambda: devices.jax_matmul_peak(config.model.dtype),
    "device": devices.jax_device,
  }


def torch_worker(config, batch):
  """Commands for one PyTorch process: train steps of transformers' T5ForConditionalGeneration with AdamW."""
  import torch
  import transformers

  m = config.model
  hf_config = transformers.T5Config(
    vocab_size=m.vocab_size,
    d_model=m.d_model,
    d_kv=m.d_kv,
    d_ff=m.d_ff,
    num_layers=m.num_encoder_layers,
    num_decoder_layers=m.num_decoder_layers,
    num_heads=m.num_heads,
    feed_forward_proj=m.feed_forward_proj,
    tie_word_embeddings=m.tie_word_embeddings,
    dropout_rate=0.0,
    decoder_start_token_id=0,
  )
  device = devices.torch_device()
  model = transformers.T5ForConditionalGeneration(hf_config).to(device).train()
  # fused: one kernel for all params on CUDA (the optimizer a GPU user picks); the CPU keeps the default.
  opt = torch.optim.AdamW(
    model.parameters(), lr=config.optimizer.learning_rate, fused=True if device == "cuda" else None
  )
  inputs = torch.from_numpy(batch["encoder_input_tokens"]).long().to(device)
  labels = torch.from_numpy(batch["decoder_target_tokens"]).long().to(device)

  def train(n):
    devices.torch_sync(device)
    start = time.perf_counter()
    for _ in range(n):
      with devices.torch_autocast(device, config.model.dtype):
        loss = model(input_ids=inputs, labels=labels).loss
      loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)
    devices.torch_sync(device)
    return time.perf_counter() - start

  return {
    "train": train,
    "matmul": lambda: devices.torch_matmul_peak(device, config.model.dtype),  # its own peak, for the same reading
    "device": lambda: ("cpu" if device == "cpu" else "gpu", devices.torch_device_name(device)),
  }


def serve(args):
  """The worker loop: build the side named by --worker, warm it up, then answer one JSON command per line."""
  config, targets_length = bench_config(args, json.loads(args.overrides))
  batch = make_batch(args.batch, args.inputs_length, targets_length, config.model.vocab_size)
  commands = (t5jax_worker if args.worker == "t5jax" else torch_worker)(config, batch)
  commands["train"](2)  # warm-up: compilation, allocator, thread pools
  # --paths workers only train (memory); --quick ones time no forward / backward.
  for name in ("forward", "backward") if not (args.train_only or args.quick) else ():
    if name in commands:
      commands[name]()
  platform_name, device = commands["device"]()
  ready = {"ready": args.batch * (args.inputs_length + targets_length), "platform": platform_name, "device": device}
  print(json.dumps(ready), flush=True)
  for line in sys.stdin:
    name, *cmd_args = json.loads(line)
    print(json.dumps(commands[name](*cmd_args)), flush=True)


class Worker:
  """A benchmark side in its own process; `ask` sends a command and waits for its answer."""

  def __init__(self, args, side, overrides=None, host_devices=1):
    env = dict(
      os.environ,
      XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {EIGHT_DEVICES}"
      if host_devices == 8
      else os.environ.get("XLA_FLAGS", ""),
      # JAX takes 75% of a GPU's memory at start; PyTorch's process shares the GPU, so JAX gets less.
      XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45"),
    )
    switches = (["--train_only"] if overrides is not None else []) + (["--quick"] if args.quick else [])
    cmd = [
      sys.executable,
      os.path.abspath(__file__),
      f"--worker={side}",
      f"--preset={args.preset}",
      f"--batch={args.batch}",
      f"--inputs_length={args.inputs_length}",
      f"--dtype={args.dtype}",
      f"--overrides={json.dumps(overrides or {})}",
      *switches,
    ]
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.tokens = self.platform = self.device = None

  def ask(self, *command):
    if command:
      self.proc.stdin.write(json.dumps(command) + "\n")
      self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"benchmark worker {self.proc.args[2]} exited with {self.proc.wait()}")
    return json.loads(line)

  def start(self):
    ready = self.ask()
    self.tokens, self.platform, self.device = ready["ready"], ready["platform"], ready["device"]
    return self

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def compare_with_pytorch(args):
  workers = {"t5jax": Worker(args, "t5jax").start(), "pytorch": Worker(args, "pytorch").start()}
  t5, torch_side = workers["t5jax"], workers["pytorch"]
  record = devices.Record(
    args.out, benchmark="train_throughput", **{k: v for k, v in vars(args).items() if v and k != "out"}
  )
  if {t5.platform, torch_side.platform} != {"cpu"}:
    print(f"devices: t5jax on {t5.device} | pytorch on {torch_side.device}", flush=True)
  record.write("devices", t5jax=t5.device, pytorch=torch_side.device)
  rates = {name: [] for name in workers}
  fwd, fwd_bwd, peaks, torch_peaks = [], [], [], []
  for r in range(args.rounds):
    for name, worker in workers.items():
      rates[name].append(worker.tokens * args.steps / worker.ask("train", args.steps))
    if not args.quick:
      fwd.append(t5.ask("forward"))
      fwd_bwd.append(t5.ask("backward"))
    peaks.append(t5.ask("matmul"))
    torch_peaks.append(torch_side.ask("matmul"))
    print(
      f"round {r}: t5jax {rates['t5jax'][-1]:,.0f} tok/s | pytorch {rates['pytorch'][-1]:,.0f} tok/s | "
      f"ratio {rates['t5jax'][-1] / rates['pytorch'][-1]:.2f}",
      flush=True,
    )
    timings = {} if args.quick else {"forward_s": fwd[-1], "forward_backward_s": fwd_bwd[-1]}
    tokens = {f"{name}_tokens_per_s": values[-1] for name, values in rates.items()}
    record.write("round", round=r, **tokens, peak_flops_per_s=peaks[-1], pytorch_peak=torch_peaks[-1], **timings)
  flops = t5.ask("flops")
  floor, matmul_flops = t5.ask("floor") if not args.quick else (None, None)
  for worker in workers.values():
    worker.close()
  ratios = [a / b for a, b in zip(rates["t5jax"], rates["pytorch"], strict=True)]
  step_time = t5.tokens / statistics.median(rates["t5jax"])
  torch_time = torch_side.tokens / statistics.median(rates["pytorch"])
  peak, torch_peak = statistics.median(peaks), statistics.median(torch_peaks)
  # On a CPU: "XLA f32 matmul peak ... CPU MFU", as benchmarks/README.md quotes them.
  peak_dtype = {"float32": "f32", "bfloat16": "bf16"}[devices.matmul_shape(t5.platform, args.dtype)[1]]
  print(
    f"median: t5jax {statistics.median(rates['t5jax']):,.0f} tok/s | pytorch "
    f"{statistics.median(rates['pytorch']):,.0f} tok/s | ratio t5jax/pytorch {statistics.median(ratios):.2f} "
    f"(min {min(ratios):.2f}, max {max(ratios):.2f})"
  )
  if not args.quick:
    f, fb = statistics.median(fwd), statistics.median(fwd_bwd)
    print(f"t5jax forward {f:.2f} s | forward+backward {fb:.2f} s | backward/forward {(fb - f) / f:.2f}")
  print(
    f"XLA {peak_dtype} matmul peak {peak / 1e9:.0f} GFLOP/s | step {flops / 1e9:.0f} GFLOP (XLA cost analysis) in "
    f"{step_time:.2f} s = {flops / step_time / 1e9:.0f} GFLOP/s | {t5.platform.upper()} MFU "
    f"{flops / step_time / peak:.0%}"
  )
  print(
    f"PyTorch: {peak_dtype} matmul peak {torch_peak / 1e9:.0f} GFLOP/s | the same FLOPs in "
    f"{torch_time:.2f} s = {flops / torch_time / 1e9:.0f} GFLOP/s, {flops / torch_time / peak:.0%} of XLA's peak"
  )
  if not args.quick:
    print(
      f"matmul floor: the step's matmuls ({matmul_flops / 1e9:.0f} GFLOP), each run alone on XLA, take "
      f"{floor:.2f} s ({matmul_flops / floor / peak:.0%} of peak); forward+backward is {fb / floor:.2f}x that, "
      f"and a step of matmuls alone would be {torch_time / floor:.2f}x PyTorch"
    )
  tokens = {f"{name}_tokens_per_s": statistics.median(values) for name, values in rates.items()}
  figures = dict(ratio=statistics.median(ratios), step_flops=flops, peak_flops_per_s=peak, pytorch_peak=torch_peak)
  mfu = dict(peak_dtype=peak_dtype, t5jax_mfu=flops / step_time / peak, pytorch_mfu=flops / torch_time / peak)
  floors = {} if args.quick else {"matmul_floor_s": floor, "matmul_floor_flops": matmul_flops}
  record.write("summary", **tokens, **figures, **mfu, **floors)  # both MFUs against XLA's peak, as printed


def compare_paths(args):
  names = ["plain"] + [name for name in args.paths.split(",") if name != "plain"]
  unknown = set(names) - set(PATHS)
  if unknown:
    raise SystemExit(f"--paths: unknown {', '.join(sorted(unknown))}; expected some of {', '.join(PATHS)}")
  workers = {name: Worker(args, "t5jax", *PATHS[name]).start() for name in names}
  rates = {name: [] for name in workers}
  for r in range(args.rounds):
    for name, worker in workers.items():
      rates[name].append(worker.tokens * args.steps / worker.ask("train", args.steps))
    print(f"round {r}: " + " | ".join(f"{n} {v[-1]:,.0f}" for n, v in rates.items()) + " tok/s", flush=True)
  for worker in workers.values():
    worker.close()
  plain = rates["plain"]
  for name, values in rates.items():
    ratios = [v / p for v, p in zip(values, plain, strict=True)]
    print(
      f"{name:7s} median {statistics.median(values):,.0f} tok/s | per-round ratio to plain: median "
      f"{statistics.median(ratios):.2f} (min {min(ratios):.2f}, max {max(ratios):.2f})"
    )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="t5.1.1-small")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--inputs_length", type=int, default=512)  # targets: span corruption's (512 -> 114)
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype of both")
  parser.add_argument("--quick", action="store_true", help="skip forward, forward+backward and matmul floor")
  parser.add_argument("--out", help="append each round and the summary to this file as JSON lines")
  parser.add_argument(
    "--paths",
    nargs="?",
    const=",".join(PATHS),
    default="",
    help="compare these training paths (comma-separated; default all) with the plain step",
  )
  parser.add_argument("--worker", choices=("t5jax", "pytorch"), help=argparse.SUPPRESS)
  parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
  parser.add_argument("--train_only", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return serve(args)
  print(
    f"{args.preset}, {args.dtype}, batch {args.batch}, inputs {args.inputs_length}, {args.steps} steps per round | "
    f"CPU: {devices.cpu_name()}, {os.cpu_count()} cores | python {platform.python_version()}",
    flush=True,
  )
  (compare_paths if args.paths else compare_with_pytorch)(args)


if __name__ == "__main__":
  main()
