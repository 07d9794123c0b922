"""The one builder of a run: config + mesh -> model, optimizer, abstract state, shardings, steps, batch spec.

train, plan, the benchmarks and the tests all build a run here, so what they compile is what training runs:

  mesh = parallel.make_mesh(config.mesh)
  with parallel.use_mesh(mesh, config.parallel.mode):
    run = setup.build(config, mesh)
    state = run.init_state()                       # or restore onto run.abstract_state's shardings
    state, metrics = run.train_step(state, parallel.host_to_global(batch, run.batch_sharding))

A distilling run (distill.py) passes its teacher's model config too; its train step then takes the teacher's
params as a third argument (`distill.bind` fixes them).

`build` creates no concrete array: the state is abstract (`jax.eval_shape`), so it works on a mesh of devices
this machine does not have (a TPU topology), where only `.lower(...).compile()` is possible.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from t5jax import distill, optim, parallel
from t5jax.data import specs
from t5jax.model import T5, T5Config, param_axes
from t5jax.model.video import VideoT5
from t5jax.model.video_augment import AugmentConfig
from t5jax.steps import make_eval_step, make_init_state, make_train_step

MODES = ("jit", "pmap")


@dataclasses.dataclass(frozen=True)
class RunSetup:
  config: Any  # the run's ml_collections config
  model_config: T5Config
  model: T5  # or its subclass VideoT5 when config.model.video_tubelet is set
  tx: optax.GradientTransformation
  schedule: Callable  # step -> learning rate
  mesh: Mesh
  abstract_state: dict  # ShapeDtypeStructs of {params, opt_state, step, rng}, with their shardings
  state_sharding: dict
  batch_spec: dict  # ShapeDtypeStructs of the global batch, with its sharding
  batch_sharding: NamedSharding
  train_step: Callable  # jitted (state, batch) -> (state, metrics); donates the state
  eval_step: Callable  # jitted (params, batch) -> summed metrics
  teacher: Any = None  # a distill.Teacher when the run distills: train_step's third argument

  def init_state(self, seed=None):
    """A fresh train state, created already sharded (init under jit with out_shardings): no device ever
    holds the whole model. Needs a mesh of this process's devices."""
    init = make_init_state(self.model_config, self.tx)
    rng = jax.random.PRNGKey(self.config.seed if seed is None else seed)
    return jax.jit(init, out_shardings=self.state_sharding)(rng)

  def lower_train_step(self):
    """The train step lowered for the state's and batch's shardings, from abstract arguments only."""
    return self.train_step.lower(self.abstract_state, self.batch_spec, *self.teacher_args)

  def compile_train_step(self):
    """The train step compiled ahead for the state's and batch's shardings (for real or planned devices)."""
    return self.lower_train_step().compile()

  @property
  def teacher_args(self):
    """The train step's arguments after (state, batch), abstract: the teacher's params, if any."""
    return (self.teacher.abstract_params,) if self.teacher else ()

  @property
  def tokens_per_batch(self):
    return sum(
      self.batch_spec[k].shape[0] * self.batch_spec[k].shape[1]
      for k in ("encoder_input_tokens", "decoder_target_tokens")
      if k in self.batch_spec
    )


def build(config, mesh, teacher_config=None):
  """A RunSetup for `config` on `mesh`; call it inside `parallel.use_mesh(mesh, config.parallel.mode)`.
  `teacher_config`: the teacher's T5Config when `config.distill` is on (see `distill.load_teacher`)."""
  model_config = T5Config.from_dict(config.model.to_dict()).validate()
  mode = config.parallel.mode
  if mode not in MODES:
    raise ValueError(f"config.parallel.mode={mode!r} is unknown; choose one of {MODES}")
  experts_axis = mesh.shape["expert"]
  if model_config.num_experts and model_config.num_experts % experts_axis:
    raise ValueError(
      f"config.model.num_experts={model_config.num_experts} does not divide over the mesh's "
      f"expert axis of {experts_axis} devices"
    )
  model = _model(config, model_config)
  teacher = distill.build_teacher(config, mesh, teacher_config, model_config) if distill.enabled(config) else None
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  # An abstract key: nothing concrete may be created while a mesh of absent devices is active.
  abstract = jax.eval_shape(make_init_state(model_config, tx), jax.ShapeDtypeStruct((2,), jnp.uint32))
  if mode == "pmap":  # classic data parallelism: every device a full copy
    state_sharding = parallel.replicated(mesh, abstract)
    step_fn = parallel.data_parallel(make_train_step(model, tx, schedule, config, data_axes=parallel.BATCH_AXES), mesh)
  else:  # params by their logical axes, optimizer state following them
    params_sharding = parallel.param_shardings(mesh, param_axes(model_config))
    state_sharding = parallel.state_shardings(mesh, tx, abstract, params_sharding)
    step_fn = make_train_step(model, tx, schedule, config, distiller=teacher and teacher.distiller)
  batch_sharding = parallel.batch_sharding(mesh, config.batch_size)
  batch_spec = {
    name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
    for name, (shape, dtype) in specs.batch_spec(config).items()
  }
  abstract = parallel.with_shardings(abstract, state_sharding)
  teacher_args, teacher_sharding = ((teacher.abstract_params,), (teacher.sharding,)) if teacher else ((), ())
  metrics_sharding = parallel.replicated(mesh, jax.eval_shape(step_fn, abstract, batch_spec, *teacher_args)[1])
  train_step = jax.jit(
    step_fn,
    in_shardings=(state_sharding, batch_sharding, *teacher_sharding),
    out_shardings=(state_sharding, metrics_sharding),
    donate_argnums=0,
  )
  eval_step = jax.jit(
    make_eval_step(model, config),
    in_shardings=(state_sharding["params"], batch_sharding),
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
    teacher=teacher,
  )


def _model(config, model_config):
  """T5, or VideoT5 with the training augmentation of `config.data.video.augment` when it reads video."""
  if not model_config.video_tubelet:
    return T5(model_config)
  a = config.data.video.augment
  augment = (
    AugmentConfig(
      size=tuple(model_config.video_size),
      scale=tuple(a.scale),
      flip=a.flip,
      brightness=a.brightness,
      contrast=a.contrast,
    )
    if a.enabled
    else None
  )
  return VideoT5(model_config, augment=augment)
