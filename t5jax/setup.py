"""The one builder of a run: config + mesh -> model, optimizer, abstract state, shardings, steps, batch spec.

train, plan, the benchmarks and the tests all build a run here, so what they compile is what training runs:

  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh, config.parallel.mode):
    run = setup.build(config, mesh)
    state = run.init_state()                       # or restore onto run.abstract_state's shardings
    state, metrics = run.train_step(state, parallel.host_to_global(batch, run.batch_sharding))

The input kind (`seams.kind`) picks the model and the batch spec; each extra loss term
(`seams.loss_terms`) adds an argument to the train step, which `RunSetup.with_term_args` fixes for training.

`build` creates no concrete array: the state is abstract (`jax.eval_shape`), so it works on a mesh of devices
this machine does not have (a TPU topology), where only `.lower(...).compile()` is possible.
"""

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from t5jax import loading, lora, optim, parallel, seams
from t5jax.model import T5, T5Config, param_axes
from t5jax.steps import make_eval_step, make_init_state, make_train_step

MODES = ("jit", "pmap")


@dataclasses.dataclass(frozen=True)
class RunSetup:
  config: Any  # the run's ml_collections config
  model_config: T5Config
  model: T5  # or a subclass, as the input kind says
  tx: optax.GradientTransformation
  schedule: Callable  # step -> learning rate
  mesh: Mesh
  abstract_state: dict  # ShapeDtypeStructs of {params, opt_state, step, rng}, with their shardings
  state_sharding: dict
  batch_spec: dict  # ShapeDtypeStructs of the global batch, with its sharding
  batch_sharding: NamedSharding
  train_step: Callable  # jitted (state, batch) -> (state, metrics); donates the state
  eval_step: Callable  # jitted (params, batch) -> summed metrics
  loss_terms: tuple = ()  # steps.LossTerm each: train_step's arguments after (state, batch), in order
  lora: Any = None  # lora.FrozenBase of a LoRA run: state params are its adapters; the base is the first argument
  params_sharding: Any = None  # the model's full params (a LoRA run's merged ones): what eval_step takes

  @property
  def step_args(self):
    """What train_step takes after (state, batch): the frozen base of a LoRA run, then each loss term's."""
    return ((self.lora,) if self.lora is not None else ()) + tuple(self.loss_terms)

  def init_state(self, seed=None):
    """A fresh train state, created already sharded (init under jit with out_shardings): no device ever
    holds the whole model. Needs a mesh of this process's devices."""
    init = make_init_state(self.model_config, self.tx, self.lora and self.lora.init_adapters)
    rng = jax.random.PRNGKey(self.config.seed if seed is None else seed)
    return jax.jit(init, out_shardings=self.state_sharding)(rng)

  def lower_train_step(self):
    """The train step lowered for the state's and batch's shardings, from abstract arguments only."""
    return self.train_step.lower(self.abstract_state, self.batch_spec, *(t.abstract_arg for t in self.step_args))

  def compile_train_step(self):
    """The train step compiled ahead for the state's and batch's shardings (for real or planned devices)."""
    return self.lower_train_step().compile()

  def load_step_args(self):
    """train_step's arguments after (state, batch), loaded once and placed on their shardings."""
    return tuple(jax.device_put(t.load_arg(), t.sharding) for t in self.step_args)

  def with_term_args(self, train_step, args=None):
    """`train_step(state, batch, *args)` -> `(state, batch) -> ...`, with `args` (default: loaded now)."""
    if not self.step_args:
      return train_step
    args = self.load_step_args() if args is None else args
    return lambda state, batch: train_step(state, batch, *args)

  def model_params(self, params, args):
    """The params the model applies from the state's: a LoRA run's adapters merged into its base (`args[0]`)."""
    return params if self.lora is None else self._merge(args[0], params)

  @functools.cached_property
  def _merge(self):
    """The merge jitted once per run (every eval calls it), laid out as eval_step takes the params."""
    return jax.jit(self.lora.merge, out_shardings=self.params_sharding)

  @property
  def data_options(self):
    """Keyword arguments of `pipeline.from_config` that the loss terms need (features they read)."""
    return {k: v for t in self.loss_terms for k, v in t.data_options().items()}

  @property
  def tokens_per_batch(self):
    return sum(
      self.batch_spec[k].shape[0] * self.batch_spec[k].shape[1]
      for k in ("encoder_input_tokens", "decoder_target_tokens")
      if k in self.batch_spec
    )


def _model_config(config, mesh):
  """The run's T5Config, validated, and checked against the mode and the mesh."""
  model_config = T5Config.from_dict(config.model.to_dict()).validate()
  if lora.enabled(config):  # the layers' dropout on their adapters' input, in train steps (lora.py)
    model_config = dataclasses.replace(model_config, lora_dropout=config.finetune.lora.dropout)
  if config.parallel.mode not in MODES:
    raise ValueError(f"config.parallel.mode={config.parallel.mode!r} is unknown; choose one of {MODES}")
  experts_axis = mesh.shape["expert"]
  if model_config.num_experts and model_config.num_experts % experts_axis:
    raise ValueError(
      f"config.model.moe.num_experts={model_config.num_experts} does not divide over the mesh's "
      f"expert axis of {experts_axis} devices"
    )
  return model_config


def build(config, mesh, loss_terms=None):
  """A RunSetup for `config` on `mesh`; call it inside `parallel.use_mesh(mesh, config.parallel.mode)`.
  `loss_terms`: default, the ones `config` turns on (`seams.loss_terms`)."""
  model_config, mode = _model_config(config, mesh), config.parallel.mode
  kind = seams.kind(config)
  model = kind.model(config, model_config)
  terms = seams.loss_terms(config, mesh, model_config) if loss_terms is None else tuple(loss_terms)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  # None unless LoRA: then the state trains its adapters only (pmap: the base too is copied to every device)
  base = lora.build(config, model_config, loading.load_params_for, mesh, replicated=mode == "pmap")
  # An abstract key: nothing concrete may be created while a mesh of absent devices is active.
  init = make_init_state(model_config, tx, base and base.init_adapters)
  abstract = jax.eval_shape(init, jax.ShapeDtypeStruct((2,), jnp.uint32))
  model_sharding = parallel.param_shardings(mesh, param_axes(model_config))
  if mode == "pmap":  # classic data parallelism: every device a full copy
    state_sharding = parallel.replicated(mesh, abstract)
    step = make_train_step(model, tx, schedule, config, data_axes=parallel.BATCH_AXES, lora=base)
    step_fn = parallel.data_parallel(step, mesh, num_args=int(base is not None))
    model_sharding = parallel.replicated(mesh, model_sharding)
  else:  # params by their logical axes, optimizer state following them
    params_sharding = parallel.param_shardings(mesh, base.adapter_axes()) if base else model_sharding
    state_sharding = parallel.state_shardings(mesh, tx, abstract, params_sharding)
    step_fn = make_train_step(model, tx, schedule, config, terms=terms, lora=base)
  batch_sharding = parallel.batch_sharding(mesh, config.batch_size)
  batch_spec = {
    name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
    for name, (shape, dtype) in seams.batch_spec(config, terms=terms).items()
  }
  abstract = parallel.with_shardings(abstract, state_sharding)
  step_args = ((base,) if base is not None else ()) + terms
  abstract_args = tuple(t.abstract_arg for t in step_args)
  metrics_sharding = parallel.replicated(mesh, jax.eval_shape(step_fn, abstract, batch_spec, *abstract_args)[1])
  train_step = jax.jit(
    step_fn,
    in_shardings=(state_sharding, batch_sharding, *(t.sharding for t in step_args)),
    out_shardings=(state_sharding, metrics_sharding),
    donate_argnums=0,
  )
  eval_step = jax.jit(
    make_eval_step(model, config),
    in_shardings=(model_sharding, batch_sharding),
    out_shardings=NamedSharding(mesh, jax.sharding.PartitionSpec()),
  )
  return RunSetup(
    config=config,
    model_config=model_config,
    model=model,
    tx=tx,
    schedule=schedule,
    mesh=mesh,
    abstract_state=abstract,
    state_sharding=state_sharding,
    batch_spec=batch_spec,
    batch_sharding=batch_sharding,
    train_step=train_step,
    eval_step=eval_step,
    loss_terms=terms,
    lora=base,
    params_sharding=model_sharding,
  )
