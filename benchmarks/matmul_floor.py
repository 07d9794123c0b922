"""The matmul floor of a step: every matmul in its jaxpr timed alone on XLA and summed, the time the step would
take if everything between the matmuls were free (benchmarks/train_throughput.py reads its step against it)."""

import collections
import math
import time


def step_matmuls(fn, *fn_args):
  """{(operand shapes, dtype, dimension numbers): count} of every dot_general `fn` runs, from its jaxpr (scan
  bodies counted once per iteration)."""
  from jax.extend import core

  counts = collections.Counter()

  def walk(jaxpr, times):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        x, y = eqn.invars
        counts[(x.aval.shape, y.aval.shape, str(x.aval.dtype), eqn.params["dimension_numbers"])] += times
      inner = times * eqn.params.get("length", 1) if eqn.primitive.name == "scan" else times
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if isinstance(sub, (core.ClosedJaxpr, core.Jaxpr)):
            walk(getattr(sub, "jaxpr", sub), inner)

  import jax

  walk(jax.make_jaxpr(fn)(*fn_args).jaxpr, 1)
  return counts


def matmul_floor(fn, *fn_args):
  """The time `fn`'s matmuls take when each runs alone on XLA:CPU (min of 3 runs, times its count), and their
  FLOPs: what the step would cost if everything between the matmuls were free."""
  import jax
  import jax.numpy as jnp

  seconds = flops = 0.0
  for (x_shape, y_shape, dtype, dims), count in step_matmuls(fn, *fn_args).items():
    (x_contract, y_contract), (_, y_batch) = dims
    x, y = jnp.ones(x_shape, dtype), jnp.ones(y_shape, dtype)
    dot = jax.jit(lambda x, y, dims=dims: jax.lax.dot_general(x, y, dims))
    jax.block_until_ready(dot(x, y))
    seconds += count * min(timed(dot, x, y) for _ in range(3))
    kept = [d for i, d in enumerate(y_shape) if i not in y_contract and i not in y_batch]
    flops += count * 2 * math.prod(x_shape) * math.prod(kept)
  return seconds, flops


def timed(fn, *fn_args):
  import jax

  start = time.perf_counter()
  jax.block_until_ready(fn(*fn_args))
  return time.perf_counter() - start
