r"""Do the model's two XLA:CPU-tuned forms earn their place on the TPU compiler? Each variant of the T5.1.1-small
train step is compiled by libtpu for a TPU topology on this CPU host (`plan --topology`'s path), and its
temporaries, FLOPs, roofline step and fusion count are printed side by side:

  - `attention.add_bias`: the position bias's batch gradient as a matmul with a ones vector behind an
    optimization barrier (what it does on XLA:CPU), against plain `logits + bias` (what it does elsewhere);
  - the gated MLP's input kernels joined into one GEMM, against two GEMMs.

  python benchmarks/tpu_forms.py [--topology v5e:2x2] [--mesh fsdp=4] [--batch 32] [--inputs 512]

Needs the TPU compiler: pip install -e '.[tpu-plan]'. Compile results are deterministic, so one run is the figure.
"""

import argparse
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from t5jax.model import attention, layers, t5  # noqa: E402


class TwoGemmMLP(layers.MLP):
  """The gated MLP with its two input projections as two GEMMs (the plain form); same params."""

  @nn.compact
  def __call__(self, x, deterministic=True):
    d_model, xd = x.shape[-1], x.astype(self.dtype)
    act = layers.ACTIVATIONS[self.feed_forward_proj.removeprefix("gated-")]
    w0, w1 = (layers.Kernel((d_model, self.d_ff), ("embed", "mlp"), d_model**-0.5, name=n)() for n in ("wi_0", "wi_1"))
    gemm = lambda w: jnp.einsum("...e,ef->...f", xd, w.astype(self.dtype))  # noqa: E731
    h = nn.with_logical_constraint(act(gemm(w0)) * gemm(w1), ("batch", "length", "mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return layers.DenseGeneral(d_model, ("mlp", "embed"), self.d_ff**-0.5, dtype=self.dtype, name="wo")(h)


@jax.custom_vjp
def _matmul_bias(logits, bias):
  return logits + bias


_matmul_bias.defvjp(  # the CPU form on every platform
  attention._add_bias_fwd, lambda shared, g: (g, attention._batch_sum_as_matmul(g) if shared else g)
)

VARIANTS = {  # name: (add_bias in its place, two-GEMM MLP)
  "as shipped (bias sum by platform, joined gate)": (None, False),
  "plain bias add": (lambda logits, bias: logits + bias, False),
  "bias sum as a matmul (the CPU form) forced": (_matmul_bias, False),
  "two-GEMM gate": (None, True),
}


def plan(args, bias_form, two_gemm):
  from configs import base
  from t5jax.planning import topology

  config = base.get_config("t5.1.1-small")
  config.batch_size, config.data.inputs_length, config.model.dtype = args.batch, args.inputs, "bfloat16"
  shipped_add_bias, shipped_mlp = attention.add_bias, t5.MLP
  attention.add_bias = bias_form or shipped_add_bias
  t5.MLP = TwoGemmMLP if two_gemm else shipped_mlp
  try:
    mesh = dict(kv.split("=") for kv in args.mesh.split(","))
    with tempfile.NamedTemporaryFile(suffix=".hlo") as hlo:
      result = topology.plan_topology(config, {k: int(v) for k, v in mesh.items()}, args.topology, hlo.name)
      text = open(hlo.name).read()
  finally:
    attention.add_bias, t5.MLP = shipped_add_bias, shipped_mlp
  result["fusions"] = len(re.findall(r"^\s*\S+ = \S+ fusion\(", text, re.M))
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--topology", default="v5e:2x2")
  parser.add_argument("--mesh", default="fsdp=4")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--inputs", type=int, default=512)
  args = parser.parse_args()
  print(f"T5.1.1-small train step, bf16, batch {args.batch} x inputs {args.inputs}, {args.topology}, mesh {args.mesh}")
  print("| variant | temporaries / chip | FLOPs / chip | roofline compute / comm | fusions in the HLO |")
  print("|---|---|---|---|---|")
  for name, (bias_form, two_gemm) in VARIANTS.items():
    r = plan(args, bias_form, two_gemm)
    if "error" in r:
      print(f"| {name} | did not compile: {r['error']} | | | |", flush=True)
      continue
    f = r["roofline"]
    print(
      f"| {name} | {r['temp_bytes'] / 2**20:,.1f} MiB | {r['flops_per_device']:.4g} | "
      f"{f['compute_s'] * 1e3:.2f} / {f['comm_s'] * 1e3:.2f} ms | {r['fusions']} |",
      flush=True,
    )


if __name__ == "__main__":
  main()
