r"""Greedy decoding tokens/s: t5jax `decode.generate` vs transformers PyTorch `generate()`, same weights.

  python benchmarks/generate_throughput.py [--preset=t5-small --batch=8 --new_tokens=64 --input_len=64 --rounds=3]
  python benchmarks/generate_throughput.py --preset=t5.1.1-base --batch=64 --dtype=bfloat16 --out=g.jsonl  # a GPU

A random-init transformers T5 of the preset's shape is saved to a temporary directory and imported with
`t5jax.from_pretrained`, so both sides decode with identical float32 weights. Both are forced to produce
exactly `new_tokens` tokens per row (EOS is forbidden until then: our `min_length`, HF's `min_new_tokens`).
Rounds alternate ours and the peer so that machine noise hits both; each side's first call (compilation,
warm-up) is excluded. Prints each round and the ratio of median tokens/s.

The peer runs in its own process (this script with --worker), told when to go over a pipe: in one process
with JAX, PyTorch's CPU threads ran ~30x slower (XLA's thread pool and torch's OpenMP pool contend).

On a CUDA machine the peer decodes on the GPU, as JAX does on its default device. `--dtype=bfloat16` computes
in bfloat16 on both sides with float32 weights (t5jax's T5Config.dtype, PyTorch's autocast), so their tokens
may part ways; `--out FILE` appends each round and the summary as JSON lines as they are measured.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import devices  # noqa: E402
import t5jax  # noqa: E402
from t5jax import decode  # noqa: E402
from t5jax.model import T5, get_preset  # noqa: E402


def hf_model(preset, directory):
  p = get_preset(preset)
  cfg = transformers.T5Config(
    vocab_size=p["vocab_size"],
    d_model=p["d_model"],
    d_kv=p["d_kv"],
    d_ff=p["d_ff"],
    num_heads=p["num_heads"],
    num_layers=p["num_encoder_layers"],
    num_decoder_layers=p["num_decoder_layers"],
    feed_forward_proj=p["feed_forward_proj"],
    tie_word_embeddings=p["tie_word_embeddings"],
    dropout_rate=0.0,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
  )
  torch.manual_seed(0)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  model.save_pretrained(directory)
  return model


def inputs(batch, length, preset):
  rng = np.random.default_rng(0)
  ids = rng.integers(3, min(32000, get_preset(preset)["vocab_size"]), (batch, length))
  ids[:, -1] = 1
  return ids, np.ones_like(ids)


def worker(args):
  """The peer's process: load the saved HF model, then decode once per 'go' line, answering in JSON."""
  device = devices.torch_device()
  model = transformers.T5ForConditionalGeneration.from_pretrained(args.worker).to(device).eval()
  ids, mask = (torch.tensor(x, device=device) for x in inputs(args.batch, args.input_len, args.preset))
  print(json.dumps(devices.torch_device_name(device)), flush=True)
  for _ in sys.stdin:
    devices.torch_sync(device)
    start = time.perf_counter()
    with torch.no_grad(), devices.torch_autocast(device, args.dtype):
      out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=False,
        num_beams=1,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
      )
    out = out.cpu().numpy()  # waits for the GPU
    print(json.dumps(dict(seconds=time.perf_counter() - start, tokens=out[:, 1:].tolist())), flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="t5-small")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--input_len", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype of both")
  parser.add_argument("--out", help="append each round and the summary to this file as JSON lines")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return worker(args)

  # JAX would take 75% of a GPU's memory at its start; the peer's process decodes on the same GPU.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
  tmp = tempfile.TemporaryDirectory()
  hf_model(args.preset, tmp.name)
  _, params, config = t5jax.from_pretrained(tmp.name)
  model = T5(dataclasses.replace(config, dtype=args.dtype))
  peer = subprocess.Popen(
    [sys.executable, os.path.abspath(__file__), f"--worker={tmp.name}"]
    + [f"--{k}={getattr(args, k)}" for k in ("preset", "batch", "new_tokens", "input_len", "dtype")],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
  )
  peer_device = json.loads(peer.stdout.readline())
  record = devices.Record(
    args.out, benchmark="generate_throughput", **{k: v for k, v in vars(args).items() if v and k != "out"}
  )
  ids, mask = inputs(args.batch, args.input_len, args.preset)
  n = args.batch * args.new_tokens

  def ours():
    out = decode.generate(model, params, ids, mask, max_new_tokens=args.new_tokens, min_length=args.new_tokens)
    return np.asarray(jax.block_until_ready(out))

  def theirs():
    peer.stdin.write("go\n")
    peer.stdin.flush()
    return json.loads(peer.stdout.readline())

  print(
    f"{args.preset}: {jax.tree.reduce(lambda a, x: a + x.size, params, 0) / 1e6:.1f}M params, batch "
    f"{args.batch}, input {args.input_len}, {args.new_tokens} new tokens, torch threads "
    f"{torch.get_num_threads()}, jax {jax.__version__} on {jax.devices()[0].platform}"
    + ("" if args.dtype == "float32" else f", {args.dtype}")
  )
  _, jax_device = devices.jax_device()
  if jax.devices()[0].platform != "cpu" or peer_device != jax_device:
    print(f"devices: t5jax on {jax_device} | transformers on {peer_device}")
  a, b = ours(), np.array(theirs()["tokens"])  # warm-up (compiles), and a check of both outputs
  assert a.shape == b.shape == (args.batch, args.new_tokens), (a.shape, b.shape)
  print(f"greedy tokens identical to transformers: {np.array_equal(a, b)} ({np.mean(a == b):.3f} of positions agree)")
  record.write("devices", t5jax=jax_device, transformers=peer_device, agree=float(np.mean(a == b)))
  rates = {"t5jax": [], "transformers": []}
  for r in range(args.rounds):
    for name, fn in (("t5jax", ours), ("transformers", theirs)):
      start = time.perf_counter()
      seconds = fn()["seconds"] if name == "transformers" else (fn(), time.perf_counter() - start)[1]
      rates[name].append(n / seconds)
      print(f"round {r}: {name:>12s} {seconds:7.3f} s  {n / seconds:8.1f} tokens/s", flush=True)
      record.write("round", round=r, side=name, seconds=seconds, tokens_per_s=n / seconds)
  med = {k: statistics.median(v) for k, v in rates.items()}
  print(
    f"median tokens/s: t5jax {med['t5jax']:.1f}, transformers {med['transformers']:.1f}; "
    f"ratio {med['t5jax'] / med['transformers']:.2f}x"
  )
  record.write("summary", **{f"{k}_tokens_per_s": v for k, v in med.items()}, ratio=med["t5jax"] / med["transformers"])
  peer.stdin.close()
  peer.wait()
  tmp.cleanup()


if __name__ == "__main__":
  main()
