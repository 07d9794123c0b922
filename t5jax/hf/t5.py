"""Hugging Face T5 checkpoints in and out: HF tensors <-> the t5jax param tree (config.json <-> T5Config: config.py).

T5, mT5 and ByT5 (`T5ForConditionalGeneration`), and Switch Transformers (`model_type: switch_transformers`,
whose MoE config and FFN tensors switch.py maps); a T5Config with experts is exported as the latter.

  params, config = load_hf(HF_DIR)          # model.safetensors (single or sharded) or pytorch_model.bin
  save_hf(params, config, OUT_DIR)          # config.json + model.safetensors for transformers

Layouts (HF torch Linear weights are [out, in]; ours are [in, out] with heads split out):
  {stack}.block.{i}.layer.{j}.{SelfAttention|EncDecAttention}.{q,k,v}.weight [heads*kv, embed] <-> [embed, heads, kv]
  ....o.weight [embed, heads*kv] <-> out/kernel [heads, kv, embed]
  ....DenseReluDense.{wi,wi_0,wi_1}.weight [mlp, embed] <-> [embed, mlp];  wo [embed, mlp] <-> [mlp, embed]
  {stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight [buckets, heads]: the same in both.
Tensors are read one at a time with plain file reads (not mmap, whose touched pages would stay in RSS) and
laid out on the default jax device at once, so peak host memory is the float32 params plus a few tensors.
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from t5jax.hf import switch
from t5jax.hf.config import config_from_hf, hf_config_dict, read_hf_config, scales_decoder_output
from t5jax.model import layer_stack

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_BIN, TORCH_BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Tensors transformers keeps for tying or history; their content is shared.weight or unused.
_IGNORED = (
  "encoder.embed_tokens.weight",
  "decoder.embed_tokens.weight",
  "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
)
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}


def has_hf_weights(path):
  names = (SAFETENSORS, SAFETENSORS_INDEX, TORCH_BIN, TORCH_BIN_INDEX)
  return any(os.path.isfile(os.path.join(path, name)) for name in names)


# ---------------------------------------------------------------------------------------------------------
# The name map: one row per tensor, (our path in the unscanned tree, HF name, layout kind, our shape).


def param_map(config):
  c = config
  hk = (c.num_heads, c.d_kv)
  mlp = ("wi_0", "wi_1") if c.is_gated else ("wi",)
  rows = [(("shared_embedding", "embedding"), "shared.weight", "copy", (c.vocab_size, c.d_model))]
  for stack, n in (("encoder", c.num_encoder_layers), ("decoder", c.num_decoder_layers)):
    rows.append(
      (
        (stack, "relpos_bias", "rel_embedding"),
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "copy",
        (c.relative_attention_num_buckets, c.num_heads),
      )
    )
    attns = (
      [("attention", "attention_norm", "SelfAttention")]
      if stack == "encoder"
      else [
        ("self_attention", "self_attention_norm", "SelfAttention"),
        ("cross_attention", "cross_attention_norm", "EncDecAttention"),
      ]
    )
    for i in range(n):
      ours, hf = (stack, f"layers_{i}"), f"{stack}.block.{i}.layer"
      for j, (attn, norm, hf_attn) in enumerate(attns):
        rows.append((ours + (norm, "scale"), f"{hf}.{j}.layer_norm.weight", "copy", (c.d_model,)))
        for ours_name, hf_name in (("query", "q"), ("key", "k"), ("value", "v")):
          rows.append(
            (ours + (attn, ours_name, "kernel"), f"{hf}.{j}.{hf_attn}.{hf_name}.weight", "qkv", (c.d_model, *hk))
          )
        rows.append((ours + (attn, "out", "kernel"), f"{hf}.{j}.{hf_attn}.o.weight", "out", (*hk, c.d_model)))
      j = len(attns)
      rows.append((ours + ("mlp_norm", "scale"), f"{hf}.{j}.layer_norm.weight", "copy", (c.d_model,)))
      if c.num_experts:
        rows += switch.ffn_rows(c, c.is_sparse(stack, i), ours + ("mlp",), f"{hf}.{j}")
        continue
      for w in mlp:
        rows.append((ours + ("mlp", w, "kernel"), f"{hf}.{j}.DenseReluDense.{w}.weight", "linear", (c.d_model, c.d_ff)))
      rows.append((ours + ("mlp", "wo", "kernel"), f"{hf}.{j}.DenseReluDense.wo.weight", "linear", (c.d_ff, c.d_model)))
    rows.append(((stack, "final_norm", "scale"), f"{stack}.final_layer_norm.weight", "copy", (c.d_model,)))
  if not c.tie_word_embeddings:
    rows.append((("lm_head", "kernel"), "lm_head.weight", "linear", (c.d_model, c.vocab_size)))
  return rows


def _hf_shape(kind, shape):
  if kind == "copy":
    return tuple(shape)
  if kind == "linear":
    return tuple(shape[::-1])
  if kind == "qkv":  # [embed, heads, kv] -> [heads*kv, embed]
    return (shape[1] * shape[2], shape[0])
  return (shape[2], shape[0] * shape[1])  # out: [heads, kv, embed] -> [embed, heads*kv]


@functools.partial(jax.jit, static_argnums=(0, 2))
def _from_hf(kind, w, shape):
  """An HF tensor (any float dtype) to our layout as a float32 jax array.

  On device rather than in numpy: XLA's transpose is several times faster than numpy's strided copy.
  """
  w = w.astype(jnp.float32)
  return w if kind == "copy" else jnp.transpose(w).reshape(shape)  # linear, qkv, out: transpose, split heads


def _to_hf(kind, w):
  w = np.asarray(w, np.float32)
  if kind == "copy":
    return np.ascontiguousarray(w)
  if kind == "qkv":
    w = w.reshape(w.shape[0], -1)
  elif kind == "out":
    w = w.reshape(-1, w.shape[-1])
  return np.ascontiguousarray(w.T)


# ---------------------------------------------------------------------------------------------------------
# Reading tensors.


def _read_safetensors_header(path):
  """(offset of the data, header) of a safetensors file, checked against the file's size.

  The format: u64 little-endian header size, a JSON header {name: {dtype, shape, data_offsets}}, the data.
  A file cut short (an interrupted copy or download) is caught here, before any tensor is read.
  """
  file_size = os.path.getsize(path)
  corrupt = f"{path}: truncated or corrupt safetensors file ({file_size:,} bytes)"
  with open(path, "rb") as f:
    head = f.read(8)
    size = int.from_bytes(head, "little")
    if len(head) < 8 or 8 + size > file_size:
      raise ValueError(f"{corrupt}: too short for its header; copy or download it again")
    try:
      header = json.loads(f.read(size))
      end = 0
      for name, info in header.items():
        if name == "__metadata__" or info["dtype"] not in _ST_DTYPES:
          continue  # the caller names an unsupported dtype
        start, stop = info["data_offsets"]
        if stop - start != np.dtype(_ST_DTYPES[info["dtype"]]).itemsize * int(np.prod(info["shape"])):
          raise ValueError(f"tensor {name}'s data_offsets do not match its shape")
        end = max(end, stop)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # json.JSONDecodeError is a ValueError
      raise ValueError(f"{corrupt}: unreadable header ({e}); copy or download it again") from None
  if 8 + size + end > file_size:
    raise ValueError(f"{corrupt}: its header needs {8 + size + end:,} bytes; copy or download it again")
  return 8 + size, header


class _Tensors:
  """name -> (shape, file) of every tensor in an HF directory, and `get(name)` reading one as numpy."""

  def __init__(self, hf_dir):
    self.dir = hf_dir
    self.index = {}  # name -> (file, shape, reader info)
    self._torch = {}  # file -> state dict (torch keeps its own lazy mmap)
    if os.path.isfile(os.path.join(hf_dir, SAFETENSORS)):
      self._scan_safetensors(SAFETENSORS)
    elif os.path.isfile(os.path.join(hf_dir, SAFETENSORS_INDEX)):
      for fname in self._index_files(SAFETENSORS_INDEX):
        self._scan_safetensors(fname)
    elif os.path.isfile(os.path.join(hf_dir, TORCH_BIN)) or os.path.isfile(os.path.join(hf_dir, TORCH_BIN_INDEX)):
      files = [TORCH_BIN] if os.path.isfile(os.path.join(hf_dir, TORCH_BIN)) else self._index_files(TORCH_BIN_INDEX)
      for fname in files:
        self._scan_torch(fname)
    else:
      raise FileNotFoundError(f"{hf_dir}: no {SAFETENSORS}, {SAFETENSORS_INDEX} or {TORCH_BIN}")

  def _index_files(self, index_name):
    with open(os.path.join(self.dir, index_name)) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    for fname in files:
      if not os.path.isfile(os.path.join(self.dir, fname)):
        raise FileNotFoundError(f"{os.path.join(self.dir, fname)}: listed in {index_name} but missing")
    return files

  def _scan_safetensors(self, fname):
    path = os.path.join(self.dir, fname)
    data_start, header = _read_safetensors_header(path)
    for name, info in header.items():
      if name != "__metadata__":
        if info["dtype"] not in _ST_DTYPES:
          raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}; expected a float type")
        self.index[name] = (fname, tuple(info["shape"]), (data_start + info["data_offsets"][0], info["dtype"]))

  def _scan_torch(self, fname):
    try:
      import torch
    except ImportError as e:
      raise FileNotFoundError(
        f"{os.path.join(self.dir, fname)}: reading .bin needs torch (pip install torch), or convert it to safetensors"
      ) from e
    # weights_only: tensors and containers only, never arbitrary pickled code. mmap: no full read into RAM.
    state = torch.load(os.path.join(self.dir, fname), map_location="cpu", weights_only=True, mmap=True)
    self._torch[fname] = state
    for name, t in state.items():
      self.index[name] = (fname, tuple(t.shape), None)

  def file(self, name):
    return os.path.join(self.dir, self.index[name][0])

  def get(self, name):
    fname, shape, info = self.index[name]
    if info is None:
      import torch

      t = self._torch[fname][name]
      return (t if t.dtype == torch.float32 else t.float()).numpy()  # numpy has no bfloat16
    offset, dtype = info
    dtype = np.dtype(_ST_DTYPES[dtype])
    with open(os.path.join(self.dir, fname), "rb") as f:
      f.seek(offset)
      w = np.fromfile(f, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)))
    return w.reshape(shape)


def _check_shape(tensors, name, expected):
  if name not in tensors.index:
    raise ValueError(f"{tensors.dir}: tensor {name} is missing (expected shape {expected} from config.json)")
  got = tensors.index[name][1]
  if got != tuple(expected):
    raise ValueError(f"{tensors.file(name)}: tensor {name} has shape {got} but config.json implies {expected}")


def load_hf(hf_dir, scan_layers=False):
  """Reads an HF T5 directory into (float32 jax params, T5Config). Errors name the file and tensor.

  `scan_layers=True` stacks each stack's layers for the nn.scan layout. Tying is decided by the tensors:
  an `lm_head.weight` that differs from `shared.weight`, or an unscaled output (v1.1), gives an untied head.
  """
  hf = read_hf_config(hf_dir)
  tensors = _Tensors(hf_dir)
  if "shared.weight" not in tensors.index and "encoder.embed_tokens.weight" in tensors.index:
    tensors.index["shared.weight"] = tensors.index["encoder.embed_tokens.weight"]  # some old files
  switch.check_one_embedding(hf, tensors)
  scale = scales_decoder_output(hf)
  head = None
  if "lm_head.weight" in tensors.index:
    # The tensors, not the flags, decide tying: a head equal to the table is the tied head saved twice.
    head = tensors.get("lm_head.weight")
    if "shared.weight" in tensors.index and np.array_equal(head, tensors.get("shared.weight")):
      head = None
  # Our tied head always rescales; an unscaled head (v1.1) or a distinct one needs our own lm_head.
  untied = head is not None or not scale
  config = config_from_hf(hf, untied, scan_layers)
  rows = param_map(config)
  for _, name, kind, shape in rows:
    _check_shape(
      tensors, name if not (name == "lm_head.weight" and head is None) else "shared.weight", _hf_shape(kind, shape)
    )
  known = {name for _, name, _, _ in rows} | set(_IGNORED) | {"lm_head.weight"}
  extra = sorted(set(tensors.index) - known)
  if extra:
    raise ValueError(
      f"{tensors.file(extra[0])}: unexpected tensor {extra[0]} (shape "
      f"{tensors.index[extra[0]][1]}) for the shapes config.json gives ({len(extra)} unexpected)"
    )
  # One tensor at a time: read, lay out on device, drop the host copy; peak = params + a few tensors.
  flat = {}
  for path, name, kind, shape in rows:
    if name == "lm_head.weight":
      w = _from_hf(kind, head if head is not None else tensors.get("shared.weight"), shape)
      if head is not None and scale:  # a v1.0-style rescaled output with a separate head: fold the scale in
        w = w * jnp.float32(config.d_model**-0.5)
    else:
      w = _from_hf(kind, tensors.get(name), shape)
    # Wait for each one: async dispatch would otherwise queue many host tensors at once and raise the peak.
    flat[path] = w.block_until_ready()
  del head
  switch.stack_experts_in_place(flat, config, jnp.stack)
  if scan_layers:
    layer_stack.stack_flat_in_place(flat, config)
  return traverse_util.unflatten_dict(flat), config


# ---------------------------------------------------------------------------------------------------------
# Writing.


def to_hf_tensors(params, config):
  """Our params (scanned or not) -> {HF name: float32 numpy array}, shapes checked against the config."""
  flat = layer_stack.unstack_flat_in_place(traverse_util.flatten_dict(params), config)
  switch.unstack_experts_in_place(flat, config)
  out = {}
  for path, name, kind, shape in param_map(config):
    if path not in flat:
      raise ValueError(f"params have no {'/'.join(path)} (config and params disagree)")
    w = np.asarray(flat[path])
    if w.shape != tuple(shape):
      raise ValueError(f"param {'/'.join(path)} has shape {w.shape} but the config implies {tuple(shape)}")
    out[name] = _to_hf(kind, w)
  switch.add_untied_embeddings(out, config)
  return out


def save_hf(params, config, out_dir):
  """Writes config.json and model.safetensors that transformers' T5ForConditionalGeneration loads."""
  from safetensors.numpy import save_file

  os.makedirs(out_dir, exist_ok=True)
  config_path, weights_path = os.path.join(out_dir, "config.json"), os.path.join(out_dir, SAFETENSORS)
  with open(config_path, "w") as f:
    json.dump(hf_config_dict(config), f, indent=2)
  save_file(to_hf_tensors(params, config), weights_path, metadata={"format": "pt"})
  shutil.copymode(config_path, weights_path)  # safetensors creates its file 0600, whatever the umask
