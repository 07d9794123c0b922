r"""Training tokens/s of t5jax against transformers' PyTorch T5 at the same shape, in the same run.

  python benchmarks/train_throughput.py [--preset=t5.1.1-small] [--batch=8] [--rounds=5] [--steps=3]

Both sides train a random-init T5.1.1-small-shaped model (float32, inputs 512, targets 114, no dropout)
with AdamW on the same random token batch. Rounds alternate t5jax and PyTorch so machine noise hits both
alike; each round times `--steps` full steps (forward, backward, update) after warm-up. Prints tokens/s per
round and the ratio t5jax / PyTorch. Needs `torch==2.13.0` and `transformers` (see benchmarks/README.md).
"""

import argparse
import importlib.util
import os
import statistics
import time

import jax
import numpy as np

from t5jax import parallel, setup
from t5jax.data import specs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_base_config(preset):
  spec = importlib.util.spec_from_file_location("base_config", os.path.join(ROOT, "configs", "base.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def make_batch(batch, inputs_length, targets_length, vocab, seed=0):
  rng = np.random.default_rng(seed)
  inputs = rng.integers(3, vocab, (batch, inputs_length), dtype=np.int32)
  targets = rng.integers(3, vocab, (batch, targets_length), dtype=np.int32)
  decoder_inputs = np.concatenate([np.zeros((batch, 1), np.int32), targets[:, :-1]], axis=1)
  return {"encoder_input_tokens": inputs, "decoder_target_tokens": targets,
          "decoder_input_tokens": decoder_inputs, "decoder_loss_weights": np.ones_like(targets)}


def t5jax_runner(config, batch):
  """Returns run(n): n train steps of t5jax as `setup.build` compiles them for training, blocking on the result."""
  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh, config.parallel.mode):
    run_setup = setup.build(config, mesh)
    state, step = run_setup.init_state(), run_setup.compile_train_step()
  device_batch = parallel.host_to_global(batch, run_setup.batch_sharding)

  def run(n):
    nonlocal state
    for _ in range(n):
      state, metrics = step(state, device_batch)
    jax.block_until_ready(metrics)
  return run


def torch_runner(config, batch):
  """Returns run(n): n training steps of transformers' T5ForConditionalGeneration with torch.optim.AdamW."""
  import torch
  import transformers

  m = config.model
  hf_config = transformers.T5Config(
      vocab_size=m.vocab_size, d_model=m.d_model, d_kv=m.d_kv, d_ff=m.d_ff, num_layers=m.num_encoder_layers,
      num_decoder_layers=m.num_decoder_layers, num_heads=m.num_heads, feed_forward_proj=m.feed_forward_proj,
      tie_word_embeddings=m.tie_word_embeddings, dropout_rate=0.0, decoder_start_token_id=0)
  model = transformers.T5ForConditionalGeneration(hf_config).train()
  opt = torch.optim.AdamW(model.parameters(), lr=config.optimizer.learning_rate)
  inputs = torch.from_numpy(batch["encoder_input_tokens"]).long()
  labels = torch.from_numpy(batch["decoder_target_tokens"]).long()

  def run(n):
    for _ in range(n):
      loss = model(input_ids=inputs, labels=labels).loss
      loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)
  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="t5.1.1-small")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--inputs_length", type=int, default=512)   # targets: span corruption's (512 -> 114)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()

  config = load_base_config(args.preset)
  config.optimizer.update(name="adamw", schedule="constant", learning_rate=1e-4)
  config.batch_size, config.data.inputs_length = args.batch, args.inputs_length
  targets_length = specs.targets_length(config.data)
  batch = make_batch(args.batch, args.inputs_length, targets_length, config.model.vocab_size)
  tokens = args.batch * (args.inputs_length + targets_length) * args.steps
  runners = {"t5jax": t5jax_runner(config, batch), "pytorch": torch_runner(config, batch)}
  for run in runners.values():
    run(2)  # warm-up: compilation, allocator, thread pools

  print(f"{args.preset}, float32, batch {args.batch}, {args.inputs_length}/{targets_length}, "
        f"{args.steps} steps per round, jax {jax.__version__} on {jax.devices()[0].platform}")
  rates = {name: [] for name in runners}
  for r in range(args.rounds):
    for name, run in runners.items():
      start = time.perf_counter()
      run(args.steps)
      rates[name].append(tokens / (time.perf_counter() - start))
    print(f"round {r}: t5jax {rates['t5jax'][-1]:,.0f} tok/s | pytorch {rates['pytorch'][-1]:,.0f} tok/s | "
          f"ratio {rates['t5jax'][-1] / rates['pytorch'][-1]:.2f}")
  ratios = [a / b for a, b in zip(rates["t5jax"], rates["pytorch"])]
  print(f"median: t5jax {statistics.median(rates['t5jax']):,.0f} tok/s | pytorch "
        f"{statistics.median(rates['pytorch']):,.0f} tok/s | ratio t5jax/pytorch {statistics.median(ratios):.2f} "
        f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
  main()
