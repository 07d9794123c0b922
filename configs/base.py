r"""Span-corruption pretraining of a tiny T5.1.1 on the embedded corpus: no download, a few minutes on a CPU.

  python -m t5jax.train --config=configs/base.py --workdir=/tmp/t5jax_base

The corpus (docstrings of the Python standard library) and a SentencePiece model trained on it are built on
the first run and cached in the workdir. `--config=configs/base.py:t5.1.1-small` swaps in a real T5 size;
any key can be overridden, e.g. `--config.total_steps=50 --config.optimizer.name=adamw`.
"""

import ml_collections
from ml_collections.config_dict import placeholder

from t5jax.model.presets import get_preset


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = 400
  c.batch_size = 32  # global batch, in examples
  c.grad_accum_steps = 1  # microbatches per step (batch_size must divide evenly)
  c.log_every = 25
  c.eval_every = 200
  c.eval_steps = 4  # held-out batches per eval
  c.checkpoint_every = 200
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.init_from = placeholder(str)  # weights-only start: a `t5jax.convert import-hf` dir or another run's workdir

  # Devices: a mesh over (data, fsdp, tensor, expert); -1 takes the devices left over. mode 'jit' shards by
  # the logical axis rules in t5jax/parallel.py; 'pmap' is classic replicated data parallelism.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  c.parallel = ml_collections.ConfigDict(dict(mode="jit"))

  # A model small enough for a laptop CPU; the vocab is the embedded tokenizer's 4,000 pieces + 100
  # sentinels, padded up to a multiple of 128 as T5 pads 32,100 to 32,128.
  c.model = ml_collections.ConfigDict(get_preset(arg or "t5.1.1-tiny"))
  if not arg:
    c.model.update(
      vocab_size=4224, d_model=128, num_heads=4, d_kv=32, d_ff=384, num_encoder_layers=3, num_decoder_layers=3
    )
  c.model.dropout_rate = 0.0  # T5 pretrains without dropout

  c.data = data_config()
  c.decode_eval_every = placeholder(int)  # tasks: decode the eval tasks and log per-task metrics every N steps
  c.decode_eval_examples = 64  # per task

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adafactor"  # adafactor | adamw
  c.optimizer.learning_rate = 0.01
  c.optimizer.schedule = "rsqrt"  # rsqrt | cosine | linear | constant
  c.optimizer.warmup_steps = 50
  c.optimizer.end_lr_ratio = 0.0  # cosine / linear: final lr as a fraction of the peak
  c.optimizer.clip_grad_norm = placeholder(float)  # None = off (Adafactor clips its updates itself)
  c.optimizer.weight_decay = 0.0
  c.optimizer.adafactor_decay_rate = 0.8
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.rms_scaled = False  # adamw: nanoT5's RMS-scaled updates

  # Parameter-efficient fine-tuning of the init_from model (t5jax/lora.py): rank 0 trains every weight.
  c.finetune = ml_collections.ConfigDict()
  c.finetune.lora = ml_collections.ConfigDict(
    dict(
      rank=0,
      alpha=16.0,  # the adapters' delta is (alpha / rank) A B
      dropout=0.0,
      targets=("q", "k", "v", "o", "wi", "wo"),  # every linear layer, as QLoRA found needed; + experts, video_embed
      base_dtype="float32",  # the frozen base's storage: float32 | bfloat16 | int8 (QLoRA-style)
    )
  )

  c.loss = ml_collections.ConfigDict()
  c.loss.z_loss = 1e-4
  c.loss.label_smoothing = 0.0
  c.loss.normalizer = placeholder(float)  # None = per real target token; a number = T5's constant
  return c


def data_config():
  """Data settings, grouped by concern; unset (None) ones take the embedded default."""
  d = ml_collections.ConfigDict()
  d.kind = "span_corruption"  # span_corruption | tasks (a mixture from t5jax/data/tasks.py) | video (configs/video.py)
  d.inputs_length = 128  # encoder length; raw chunks are longer so span corruption lands on it exactly
  d.targets_length = 32  # tasks: decoder length (span corruption derives it from inputs_length)
  d.num_workers = 0  # loader worker processes (0 = background threads of the trainer)
  d.strict = False  # a malformed JSONL line: skipped and counted (False) or an error (True)
  d.source = ml_collections.ConfigDict(
    dict(
      text_glob=placeholder(str),  # your own text files (one document per line); None = the embedded corpus
      tfds_name=placeholder(str),  # span corruption from TFDS (e.g. c4/en), read when data_dir is set
      data_dir=placeholder(str),  # where TFDS datasets are prepared (span corruption and TFDS tasks)
      max_documents=placeholder(int),  # TFDS: documents read into the token cache (None = all)
      eval_percent=2,  # text files and the embedded corpus: documents held out for eval (even, by a hash)
    )
  )
  d.tokenizer = ml_collections.ConfigDict(
    dict(
      path=placeholder(str),  # a SentencePiece .model (e.g. T5's spiece.model); None = train one
      spm_vocab_size=4000,  # pieces of the tokenizer trained when path is None
    )
  )
  d.corruption = ml_collections.ConfigDict(dict(noise_density=0.15, mean_noise_span_length=3.0))
  # kind=tasks (see configs/multitask.py): registered task names and how they mix.
  d.mixture = ml_collections.ConfigDict(
    dict(
      tasks=(),
      rate="proportional",  # rate: equal | proportional (to min(size, cap)) | temperature
      cap=2**19,
      temperature=1.0,
    )
  )
  d.packing = ml_collections.ConfigDict(dict(enabled=False, pool_factor=4))  # pool: examples per row
  # Your own JSONL files as the task "jsonl" (one object per line; the keys below hold the two texts).
  d.jsonl = ml_collections.ConfigDict(
    dict(train=placeholder(str), validation=placeholder(str), inputs="inputs", targets="targets", prefix="")
  )
  return d
