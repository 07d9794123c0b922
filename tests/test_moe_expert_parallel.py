"""Expert parallelism on 8 host devices: the explicit all-to-all (moe.expert_parallel='all_to_all') gives the
outputs and gradients of the annotation path on one device, with top-1, top-2 and expert choice routing,
fsdp and tensor axes, scan_layers and remat; and it really exchanges tokens with all-to-alls."""

import subprocess
import sys

from conftest import ROOT, host_devices_env

# Run in a subprocess: the 8 host devices must be asked for before jax starts.
_SCRIPT = """
import dataclasses, sys, numpy as np, jax, jax.numpy as jnp, flax.linen as nn
sys.path.insert(0, sys.argv[1])
from tests.test_moe import make_config, ids_batch, with_moe
from t5jax import parallel
from t5jax.model import T5, init_params, layer_stack, moe

def mlp_grads(cfg, params, x):
  def loss(p):
    out, mut = moe.MoeMLP(cfg).apply({"params": p}, x, mutable=moe.COLLECTIONS)
    aux, metrics = moe.summarize(mut)
    return jnp.sum(out ** 2) + aux, metrics["fraction_dropped"]
  return jax.value_and_grad(loss, has_aux=True), (params,)

def model_grads(cfg, params, ids, dec):
  def loss(p):
    logits, mut = T5(cfg).apply({"params": p}, ids, dec, mutable=moe.COLLECTIONS)
    return jnp.mean(logits ** 2) + moe.summarize(mut)[0]
  return jax.value_and_grad(loss), (params,)

def on(sizes, make, cfg, *args):
  # Compiled on a mesh of these axis sizes; the program must hold all-to-alls exactly when cfg asks for them.
  mesh = parallel.make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))])
  with parallel.use_mesh(mesh):
    fn, inputs = make(cfg, *args)
    compiled = jax.jit(fn).lower(*inputs).compile()
    assert ("all-to-all" in compiled.as_text()) == (cfg.moe.expert_parallel == "all_to_all"), sizes
    return jax.device_get(compiled(*inputs))

a2a = lambda cfg: with_moe(cfg, expert_parallel="all_to_all")
results = {}
x = jax.random.normal(jax.random.key(3), (4, 8, 16))
for name, over, layouts in [("top2", dict(top_k=2), [{"data": 2, "expert": 4}, {"fsdp": 2, "expert": 2, "tensor": 2}]),
                            ("expert_choice", dict(router="expert_choice", every_decoder=0),
                             [{"data": 2, "expert": 4}])]:
  cfg = make_config(capacity_factor_eval=0.75, group_size=4, **over)   # 8 groups of 4; some drop
  params = nn.meta.unbox(moe.MoeMLP(cfg).init(jax.random.key(0), x)["params"])
  results[name] = [on({"data": 1}, mlp_grads, cfg, params, x)] + [on(s, mlp_grads, a2a(cfg), params, x) for s in layouts]
  assert results[name][0][0][1] > 0   # tokens were dropped
# The whole model, top-1, scanned and rematerialized: the shard_map sits inside nn.scan and jax.checkpoint.
cfg = make_config(capacity_factor_eval=1.0, group_size=2, scan_layers=True, remat_policy="full")
params = layer_stack.stack_layers(init_params(dataclasses.replace(cfg, scan_layers=False), jax.random.key(0)), cfg)
ids, dec = ids_batch(batch=8)
results["model"] = [on({"data": 1}, model_grads, cfg, params, ids, dec),
                    on({"data": 2, "expert": 4}, model_grads, a2a(cfg), params, ids, dec)]
for name, (ref, *others) in results.items():
  for other in others:
    # Relative to each tensor's scale: the devices sum the expert kernels' gradients in another order.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max(),
                                                         err_msg=name), other, ref)
  print(name, "matches")
# Groups that do not divide over data x fsdp x expert: a one-line error naming the setting.
cfg = a2a(make_config(group_size=16))   # 32 tokens in 2 groups
params = nn.meta.unbox(moe.MoeMLP(cfg).init(jax.random.key(0), x)["params"])
with parallel.use_mesh(parallel.make_mesh({"data": 2, "expert": 4})):
  try:
    jax.eval_shape(lambda p: moe.MoeMLP(cfg).apply({"params": p}, x), params)
  except ValueError as e:
    print("ERROR:", e)
"""


def test_all_to_all_matches_the_annotation_path_on_eight_devices():
  out = subprocess.run(
    [sys.executable, "-c", _SCRIPT, ROOT],
    cwd=ROOT,
    env=host_devices_env(8),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.count("matches") == 3, out.stdout
  assert (
    "ERROR: T5Config.moe.expert_parallel='all_to_all' splits the 2 routing groups of 16 tokens over "
    "data x fsdp x expert = 8 devices"
  ) in out.stdout
