"""Hugging Face config.json <-> T5Config: T5, mT5, ByT5, Flan-T5 and (through switch.py) Switch Transformers."""

import json
import os

from t5jax.hf import switch
from t5jax.model.config import FEED_FORWARD_PROJS, T5Config

# mT5 and ByT5 are T5 tensors under another name; umT5 is not (per-layer bias).
T5_MODEL_TYPES = ("t5", "mt5", switch.MODEL_TYPE)


def read_hf_config(hf_dir):
  """The parsed config.json of an HF T5 directory; rejects a missing file and non-T5 architectures."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file (is {hf_dir} a Hugging Face model directory?)")
  with open(path) as f:
    hf = json.load(f)
  model_type = hf.get("model_type")
  if model_type not in T5_MODEL_TYPES:
    raise ValueError(
      f"{path}: model_type {model_type!r} (architectures {hf.get('architectures')}) is not T5; "
      f"expected one of {T5_MODEL_TYPES}"
    )
  proj = hf.get("feed_forward_proj", "relu")
  if model_type == switch.MODEL_TYPE:
    switch.config_fields(hf, path)  # rejects what we cannot read, naming the key
  elif proj not in FEED_FORWARD_PROJS:
    raise ValueError(f"{path}: unknown feed_forward_proj {proj!r}; t5jax supports {FEED_FORWARD_PROJS}")
  return hf


def scales_decoder_output(hf):
  """Whether the decoder output is multiplied by d_model**-0.5 before the head (T5 v1.0 does, v1.1 not).

  transformers v5 saves this as `scale_decoder_outputs` and forces `tie_word_embeddings` to True; older
  files encode it as `tie_word_embeddings` (absent = True, HF's default).
  """
  if "scale_decoder_outputs" in hf:
    return bool(hf["scale_decoder_outputs"])
  return hf.get("tie_word_embeddings", True) is not False


def config_from_hf(hf, untied, scan_layers=False):
  """A T5Config from config.json's dict. `untied`: the checkpoint needs its own lm_head (see load_hf)."""
  num_layers = hf.get("num_layers", 6)  # defaults are HF T5Config's
  if hf.get("model_type") == switch.MODEL_TYPE:
    ffn = switch.config_fields(hf, "config.json")
  else:
    ffn = {"feed_forward_proj": hf.get("feed_forward_proj", "relu")}
  fields = dict(
    vocab_size=hf.get("vocab_size", 32128),
    d_model=hf.get("d_model", 512),
    num_heads=hf.get("num_heads", 8),
    d_kv=hf.get("d_kv", 64),
    d_ff=hf.get("d_ff", 2048),
    num_encoder_layers=num_layers,
    num_decoder_layers=hf.get("num_decoder_layers") or num_layers,
    tie_word_embeddings=not untied,
    **ffn,
    relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
    relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
    layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-6),
    dropout_rate=hf.get("dropout_rate", 0.0),
    scan_layers=scan_layers,
  )
  return T5Config.from_dict(fields).validate()  # from_dict: a Switch model's moe group arrives as a dict


def hf_config_dict(config):
  """config.json for a T5Config, readable by transformers v4 and v5 (Switch Transformers if it has experts)."""
  t5 = {
    "architectures": ["T5ForConditionalGeneration"],
    "model_type": "t5",
    "vocab_size": config.vocab_size,
    "d_model": config.d_model,
    "d_kv": config.d_kv,
    "d_ff": config.d_ff,
    "num_layers": config.num_encoder_layers,
    "num_decoder_layers": config.num_decoder_layers,
    "num_heads": config.num_heads,
    "relative_attention_num_buckets": config.relative_attention_num_buckets,
    "relative_attention_max_distance": config.relative_attention_max_distance,
    "dropout_rate": config.dropout_rate,
    "layer_norm_epsilon": config.layer_norm_epsilon,
    "initializer_factor": 1.0,
    "feed_forward_proj": config.feed_forward_proj,
    # Both readers take False to mean "no output rescaling, own lm_head" (v1.1), True the v1.0 tied head.
    "tie_word_embeddings": config.tie_word_embeddings,
    "is_encoder_decoder": True,
    "use_cache": True,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
    "dtype": "float32",
  }
  if config.num_experts:
    del t5["feed_forward_proj"]
    t5.update(switch.config_dict_update(config))
  return t5
