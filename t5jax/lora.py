"""LoRA fine-tuning (Hu et al. 2021): rank-r adapters beside frozen base kernels are the only weights trained.

  python -m t5jax.train --config=configs/multitask.py --workdir=DIR --config.init_from=BASE \
      --config.finetune.lora.rank=8 [--config.finetune.lora.base_dtype=int8]

A targeted kernel W with logical axes [*batch, *in, *out] ('layers' of a scanned stack and MoE 'experts' are
batch axes) gets A [*batch, *in, r] and B [*batch, r, *out], on the same logical axes (the rank axis is
replicated), so adapters shard wherever their kernel does. B starts at zero, so step 0 is the base model
exactly. The train step passes the adapters to the model beside the base, in a 'lora' collection that the
layers holding the kernels apply unmerged, x W + (alpha / r) dropout(x) A B (model/layers.py: lora_update;
`dropout` is PEFT's lora_dropout, and no gradient of W is computed). MoE expert kernels, which run inside
shard_map / ragged_dot, get theirs merged into W inside the step instead (without dropout). Evaluation, predict
and export merge every adapter once.

The base (`config.init_from`, any checkpoint `load_params_for` reads) is a train-step argument like
distillation's teacher: loaded once, held in `base_dtype` (float32, bfloat16, or int8 with a float32 scale per
output channel: QLoRA-style storage), never differentiated, no optimizer state, and not in the checkpoints. They
hold the adapters, the optimizer state and a record of the base (its path and a hash of its weights); a base
whose weights changed under a workdir is a one-line error. `load_checkpoint` of a LoRA workdir merges once
(loading.merge_adapters).
"""

import dataclasses
import hashlib
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from t5jax.model import layer_stack

# Target names (Hugging Face T5's module names, which PEFT's target_modules use) -> our kernels.
ATTENTION = {"q": "query", "k": "key", "v": "value", "o": "out"}
TARGETS = (*ATTENTION, "wi", "wo", "experts", "video_embed")
BASE_DTYPES = ("float32", "bfloat16", "int8")
BATCH_AXES = ("layers", "experts")  # stacked kernels: one adapter per layer / per expert


def target_of(key):
  """The target name of the param at path `key` (a tuple), or None if it is not a kernel LoRA adapts."""
  if key[-1] == "kernel" and len(key) >= 2:
    parent = key[-2]
    for name, module in ATTENTION.items():
      if parent == module:
        return name
    if parent in ("wi", "wi_0", "wi_1", "wo"):
      return "wo" if parent == "wo" else "wi"
    if key[:2] == ("video_embed", "patch"):
      return "video_embed"
  if len(key) >= 2 and key[-2] == "experts" and key[-1] in ("wi", "wi_0", "wi_1", "wo"):
    return "experts"
  return None


def enabled(config):
  lora = config.get("finetune", {}).get("lora")
  return lora is not None and lora.rank > 0


def check_config(config):
  """One-line errors for LoRA settings that cannot work (train.check_config calls this)."""
  if not enabled(config):
    return
  lora = config.finetune.lora
  unknown = [t for t in lora.targets if t not in TARGETS]
  if unknown or not lora.targets:
    raise ValueError(f"config.finetune.lora.targets={tuple(lora.targets)}: unknown {unknown}; choose from {TARGETS}")
  if lora.base_dtype not in BASE_DTYPES:
    raise ValueError(f"config.finetune.lora.base_dtype={lora.base_dtype!r} is unknown; choose one of {BASE_DTYPES}")
  if not config.init_from:
    raise ValueError(
      "config.finetune.lora.rank is set but config.init_from is not: LoRA adapts a trained base model "
      "(a `t5jax.convert import-hf` directory or a workdir)"
    )
  if lora.alpha <= 0:
    raise ValueError(f"config.finetune.lora.alpha={lora.alpha} must be positive")
  if not 0.0 <= lora.dropout < 1.0:
    raise ValueError(f"config.finetune.lora.dropout={lora.dropout} must be in [0, 1)")
  if lora.dropout and "experts" in lora.targets:
    raise ValueError(
      f"config.finetune.lora.dropout={lora.dropout} with target 'experts': expert adapters are merged into "
      "their kernels each step, which cannot drop their input token by token; use dropout 0 or drop 'experts'"
    )


def applied_unmerged(key):
  """Whether the layer holding the kernel at `key` applies its adapters itself (every DenseGeneral and the
  gated MLP's wi_0 / wi_1: a `.../kernel` param), rather than the step merging them (MoE experts)."""
  return key[-1] == "kernel" and target_of(key) != "experts"


@flax.struct.dataclass
class Int8Kernel:
  """A kernel stored as int8 with a float32 scale per output channel (its input axes reduced to 1)."""

  values: Any
  scale: Any

  def dequantize(self):
    return self.values.astype(jnp.float32) * self.scale


@dataclasses.dataclass(frozen=True)
class Layout:
  batch: int  # leading batch axes ('layers', 'experts')
  out: int  # trailing output axes: 2 for q / k / v ([heads, kv]), else 1

  def split(self, shape):
    """(batch dims, input dims, output dims) of a kernel shaped `shape`."""
    return shape[: self.batch], shape[self.batch : len(shape) - self.out], shape[len(shape) - self.out :]


def layout_of(key, axes):
  batch = 0
  while batch < len(axes) and axes[batch] in BATCH_AXES:
    batch += 1
  return Layout(batch, 2 if target_of(key) in ("q", "k", "v") else 1)


def quantizable(key):
  """Kernels that int8 storage applies to: every matmul weight (QLoRA's linear layers); embeddings, norms,
  the position bias and MoE routers stay in bfloat16."""
  return (target_of(key) is not None and "router" not in key) or key == ("lm_head", "kernel")


def _int8(w, layout):
  w = np.asarray(w, np.float32)
  b, i, _ = layout.split(w.shape)
  reduced = tuple(range(len(b), len(b) + len(i)))
  scale = np.maximum(np.abs(w).max(axis=reduced, keepdims=True), 1e-30) / 127.0
  return Int8Kernel(np.clip(np.rint(w / scale), -127, 127).astype(np.int8), scale.astype(np.float32))


def base_hash(flat):
  """A hash of a base's weights (float32 bytes, in path order): what a workdir records of its base."""
  h = hashlib.blake2b(digest_size=16)
  for key in sorted(flat):
    w = np.ascontiguousarray(np.asarray(flat[key], np.float32))
    h.update(("/".join(key) + str(w.shape)).encode())
    h.update(w.tobytes())
  return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class FrozenBase:
  """The frozen base of a LoRA run as an argument of the train step: abstract, with its shardings, and how to
  load it (`load_arg`), make adapters for it (`init_adapters`) and merge them in (`merge`)."""

  path: str
  model_config: Any
  targets: tuple
  rank: int
  scale: float  # alpha / rank
  base_dtype: str
  shapes: Any  # {path tuple: ShapeDtypeStruct} of the model's params (float32)
  axes: Any  # {path tuple: logical axes tuple} of the model's params
  layouts: Any  # {path tuple: Layout} of the adapted kernels
  abstract_arg: Any = None  # {"a/b/kernel": ShapeDtypeStruct (or an Int8Kernel of them)}, with shardings
  sharding: Any = None
  record: dict = dataclasses.field(default_factory=dict, compare=False)  # filled by load_arg: path, hash
  load_params: Any = None  # loading.load_params_for, which reads the base (build's caller passes it)

  def adapter_shapes(self):
    """{path + (lora_a | lora_b,): (shape, logical axes)} of every adapter."""
    adapters = {}
    for key, layout in self.layouts.items():
      b, i, o = layout.split(self.shapes[key].shape)
      nb, ni = len(b), len(b) + len(i)
      axes = self.axes[key]
      adapters[key + ("lora_a",)] = ((*b, *i, self.rank), (*axes[:ni], None))
      adapters[key + ("lora_b",)] = ((*b, self.rank, *o), (*axes[:nb], None, *axes[ni:]))
    return adapters

  def adapter_axes(self):
    """The adapters' logical PartitionSpecs, nested like the adapters."""
    return traverse_util.unflatten_dict({k: P(*axes) for k, (_, axes) in self.adapter_shapes().items()})

  def init_adapters(self, rng):
    """Fresh adapters: A uniform in +-1/sqrt(fan_in) (PEFT's default), B zeros, so W + AB = W at step 0.
    Drawn layer by layer, then stacked for a scanned model: both layouts start from the same adapters."""
    if self.model_config.scan_layers:
      unscanned = dataclasses.replace(self.model_config, scan_layers=False)
      shapes, axes, layouts = _kernels(unscanned, self.targets)
      per_layer = dataclasses.replace(self, model_config=unscanned, shapes=shapes, axes=axes, layouts=layouts)
      flat = traverse_util.flatten_dict(per_layer.init_adapters(rng))
      return traverse_util.unflatten_dict(layer_stack.stack_flat_in_place(flat, self.model_config))
    params = {}
    for n, (key, (shape, _)) in enumerate(sorted(self.adapter_shapes().items())):
      if key[-1] == "lora_b":
        params[key] = jnp.zeros(shape, jnp.float32)
      else:
        bound = float(np.prod(self.layouts[key[:-1]].split(self.shapes[key[:-1]].shape)[1])) ** -0.5
        params[key] = jax.random.uniform(jax.random.fold_in(rng, n), shape, jnp.float32, -bound, bound)
    return traverse_util.unflatten_dict(params)

  def delta(self, key, a, b):
    """(alpha / r) A B for the kernel at `key`, in its shape."""
    batch, ins, outs = self.layouts[key].split(self.shapes[key].shape)
    a = a.reshape((*batch, int(np.prod(ins)), self.rank))
    b = b.reshape((*batch, self.rank, int(np.prod(outs))))
    return (self.scale * jnp.matmul(a, b)).reshape(self.shapes[key].shape)

  def merge(self, base, adapters, matmul_dtype=None, unmerged=()):
    """The params the model applies: the base with each adapter's delta added (but those of kernels in
    `unmerged`), float32, except that the matmul weights come in `matmul_dtype` (default the model's compute
    dtype, which its layers cast them to anyway: a bfloat16 model then keeps a bfloat16 copy, not a float32
    one)."""
    flat = traverse_util.flatten_dict(adapters)
    matmul_dtype = matmul_dtype or self.model_config.dtype
    merged = {}
    for name, w in base.items():
      key = tuple(name.split("/"))
      w = w.dequantize() if isinstance(w, Int8Kernel) else w.astype(jnp.float32)
      if key in self.layouts and key not in unmerged:
        w = w + self.delta(key, flat[key + ("lora_a",)], flat[key + ("lora_b",)])
      merged[key] = w.astype(matmul_dtype) if quantizable(key) else w
    return traverse_util.unflatten_dict(merged)

  def train_variables(self, base, adapters):
    """The model's variables in a train step: 'params', the base (MoE expert adapters merged in), and 'lora',
    the other adapters where their layers read them: {kernel's module path: {a: A, b: (alpha / r) B}}."""
    flat = traverse_util.flatten_dict(adapters)
    unmerged = [key for key in self.layouts if applied_unmerged(key)]
    held = {}
    for key in unmerged:
      held[key[:-1] + ("a",)] = flat[key + ("lora_a",)]
      held[key[:-1] + ("b",)] = self.scale * flat[key + ("lora_b",)]
    params = self.merge(base, adapters, unmerged=set(unmerged))
    return {"params": params, "lora": traverse_util.unflatten_dict(held)}

  def to_base(self, flat):
    """Host params {path tuple: float32 array} -> the base argument, held in base_dtype."""

    def held(key, w):
      if self.base_dtype == "float32":
        return np.asarray(w, np.float32)
      if self.base_dtype == "int8" and quantizable(key):
        return _int8(w, layout_of(key, self.axes[key]))
      return np.asarray(w, jnp.bfloat16)

    return {"/".join(k): held(k, w) for k, w in flat.items()}

  def load_host(self):
    """The base's host weights {path tuple: float32 array} from `path`, in the model's layout."""
    shapes = traverse_util.unflatten_dict(dict(self.shapes))
    try:  # `fresh` as bare shapes: a param the base lacks by design stays one, and is refused below
      flat = traverse_util.flatten_dict(self.load_params(self.path, self.model_config, shapes, fresh=shapes))
    except (OSError, ValueError) as e:
      raise type(e)(f"config.init_from={self.path}: {e}") from None
    for key, w in flat.items():
      if isinstance(w, jax.ShapeDtypeStruct):  # a new video front end, an upcycled MoE's routers
        raise ValueError(
          f"config.init_from={self.path} has no {'/'.join(key)}: LoRA freezes every base param, so the base "
          "must hold them all (fine-tune it fully first)"
        )
    return {k: np.asarray(w, np.float32) for k, w in flat.items()}

  def load_arg(self):
    """The base argument (host arrays in base_dtype); fills `record` with the path and the weights' hash."""
    flat = self.load_host()
    self.record.update(path=self.path, hash=base_hash(flat))
    return self.to_base(flat)


def _kernels(model_config, targets):
  """({path: ShapeDtypeStruct}, {path: logical axes}, {path: Layout of the kernels `targets` adapt}) of a model."""
  from t5jax.model import param_axes, param_shapes

  shapes = traverse_util.flatten_dict(param_shapes(model_config))
  axes = {k: tuple(v) for k, v in traverse_util.flatten_dict(param_axes(model_config)).items()}
  return shapes, axes, {k: layout_of(k, axes[k]) for k in shapes if target_of(k) in targets}


def build(config, model_config, load_params, mesh=None, replicated=False):
  """The FrozenBase of a LoRA run on `mesh` (creates no device array; without a mesh, no abstract argument),
  or None when LoRA is off; `load_params`: `loading.load_params_for`, which its `load_arg` reads the base with;
  `replicated`: a full copy on every device (pmap mode), else sharded by its logical axes. A rank larger than
  an adapted kernel's input or output size is a one-line error."""
  from t5jax import parallel

  if not enabled(config):
    return None
  lora = config.finetune.lora
  shapes, axes, layouts = _kernels(model_config, lora.targets)
  if not layouts:
    raise ValueError(f"config.finetune.lora.targets={tuple(lora.targets)} match no kernel of this model")
  for key, layout in layouts.items():
    _, ins, outs = layout.split(shapes[key].shape)
    if lora.rank > min(np.prod(ins), np.prod(outs)):
      raise ValueError(
        f"config.finetune.lora.rank={lora.rank} exceeds kernel {'/'.join(key)} {shapes[key].shape} "
        f"(inputs {int(np.prod(ins))}, outputs {int(np.prod(outs))})"
      )
  base = FrozenBase(
    config.init_from,
    model_config,
    tuple(lora.targets),
    lora.rank,
    lora.alpha / lora.rank,
    lora.base_dtype,
    shapes,
    axes,
    layouts,
    load_params=load_params,
  )
  if mesh is None:
    return base
  held = {"/".join(k): _held_spec(base, k) for k in shapes}  # {name: (shape, dtype, axes) or Int8Kernel of them}
  is_spec = lambda x: isinstance(x, tuple) and isinstance(x[0], tuple)  # noqa: E731
  spec_of = lambda s: P() if replicated else P(*s[2])  # noqa: E731
  sharding = jax.tree.map(lambda s: parallel.param_shardings(mesh, spec_of(s)), held, is_leaf=is_spec)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s[0], s[1], sharding=sh), held, sharding, is_leaf=is_spec)
  return dataclasses.replace(base, abstract_arg=abstract, sharding=sharding)


def _held_spec(base, key):
  """(shape, dtype, logical axes) of the base param at `key` as held, or an Int8Kernel of two of them."""
  shape, axes = base.shapes[key].shape, base.axes[key]
  if base.base_dtype == "float32":
    return (shape, jnp.float32, axes)
  if base.base_dtype == "int8" and quantizable(key):
    layout = layout_of(key, axes)
    b, i, _ = layout.split(shape)
    reduced = range(len(b), len(b) + len(i))
    scale_shape = tuple(1 if d in reduced else n for d, n in enumerate(shape))
    scale_axes = tuple(None if d in reduced else a for d, a in enumerate(axes))
    return Int8Kernel((shape, jnp.int8, axes), (scale_shape, jnp.float32, scale_axes))
  return (shape, jnp.bfloat16, axes)


def check_base(recorded, base, where):
  """A one-line error when the base's weights differ from those `recorded` (a checkpoint's `lora_base`)."""
  if recorded and recorded.get("hash") != base.record.get("hash"):
    raise ValueError(
      f"{where} was trained on a base whose weights hash to {recorded.get('hash')}, but "
      f"config.init_from={base.path} now hashes to {base.record.get('hash')}: the base changed; "
      f"restore the base it was trained on ({recorded.get('path')})"
    )
