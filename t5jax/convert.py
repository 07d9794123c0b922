r"""Converts T5 checkpoints between Hugging Face and t5jax layouts.

  python -m t5jax.convert import-hf HF_DIR OUT_DIR [--scan_layers]   # -> OUT_DIR/checkpoints/0/ (+ spiece.model)
  python -m t5jax.convert export-hf CKPT_DIR OUT_DIR [--step N] [--merge]   # -> OUT_DIR/config.json +
                                                                     #    model.safetensors (+ tokenizer files)
  python -m t5jax.convert export-peft LORA_DIR OUT_DIR [--step N]    # -> adapter_config.json + adapter_model.safetensors
  python -m t5jax.convert import-peft PEFT_DIR OUT_DIR [--base BASE] # -> OUT_DIR/checkpoints/0/ (adapters)

An imported directory is laid out like a training workdir (`checkpoints/0/` with items state={"params"} and
meta={"config": {"model": ...}, "source": ...}), so `t5jax.from_pretrained`, `export-hf` and train.py's
`--config.init_from` read it like any run. CKPT_DIR may be such a directory or a training workdir (its
latest step unless --step). OUT_DIR must not exist or be empty; it appears only once complete.
A LoRA run's workdir (t5jax/lora.py) holds adapters: export-hf --merge writes its base with them merged in,
export-peft writes them alone for Hugging Face PEFT, and import-peft reads PEFT's back into a directory that
predict, evaluate and export-hf --merge read like a LoRA workdir (its base: --base, default the adapter
config's base_model_name_or_path).
The exports carry the tokenizer: export-hf writes a training workdir's as transformers' AutoTokenizer loads it, and
otherwise the tokenizer files present are copied; an output without one is reported in a warning.
"""

import argparse
import os
import shutil
import sys

from t5jax import cli


def _check_out_dir(out_dir):
  from t5jax import storage

  if storage.is_remote(storage.check(out_dir, "OUT_DIR")):
    raise ValueError(
      f"{out_dir}: convert writes a local directory; write it here, then copy it with gcloud storage cp -r"
    )
  if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
    raise FileExistsError(f"{out_dir}: output directory exists and is not empty; refusing to overwrite it")


def _copy_tokenizer_files(src, dst):
  """Copies the tokenizer files of `src` that exist; returns how many."""
  from t5jax.data.tokenizer import HF_TOKENIZER_FILES

  present = [name for name in HF_TOKENIZER_FILES if os.path.isfile(os.path.join(src, name))]
  for name in present:
    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
  return len(present)


def _write_tokenizer(src, dst, out_dir):
  """The tokenizer of `src` into `dst`: a training workdir's is written afresh for transformers (and checked
  against the run's record), any other directory's files are copied. Without one, a one-line warning."""
  from t5jax import storage
  from t5jax.workdir import record as workdir
  from t5jax.data.tokenizer import write_hf_tokenizer

  if workdir.is_run_record(src) and storage.isfile(os.path.join(src, workdir.SPIECE)):
    write_hf_tokenizer(workdir.load_run_tokenizer(src), dst)
  elif not _copy_tokenizer_files(src, dst):
    print(
      f"t5jax.convert: warning: {out_dir} has no tokenizer ({src} holds no spiece.model or "
      "tokenizer_config.json); copy the one the model was trained with beside it",
      file=sys.stderr,
      flush=True,
    )


def _write_atomically(out_dir, write):
  """Runs write(tmp_dir) then renames tmp_dir to out_dir: an interrupted run leaves no half directory, and
  the partial output of one that was killed (OUT.tmp-PID, PID gone) is removed by the next."""
  out_dir = os.path.abspath(out_dir)
  _check_out_dir(out_dir)
  _remove_killed_outputs(out_dir)
  tmp = f"{out_dir}.tmp-{os.getpid()}"
  os.makedirs(tmp)
  try:
    write(tmp)
    if os.path.isdir(out_dir):
      _check_out_dir(out_dir)  # filled meanwhile? then it stays as it is
      os.rmdir(out_dir)  # empty; rename cannot replace a directory on every OS
    os.rename(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _remove_killed_outputs(out_dir):
  """Removes OUT.tmp-PID directories whose process is gone; refuses while another conversion writes OUT."""
  from t5jax.workdir import run_lock

  parent, name = os.path.split(out_dir)
  for entry in os.listdir(parent or "."):
    pid = entry.removeprefix(f"{name}.tmp-")
    if entry == f"{name}.tmp-{pid}" and pid.isdigit():
      if run_lock.running(int(pid)):
        raise FileExistsError(
          f"{out_dir}: another conversion (pid {pid}) is writing it into "
          f"{os.path.join(parent, entry)}; wait for it or stop it"
        )
      shutil.rmtree(os.path.join(parent, entry))
      print(
        f"t5jax.convert: removed {os.path.join(parent, entry)}, the partial output of a conversion that was killed",
        file=sys.stderr,
        flush=True,
      )


def import_hf(hf_dir, out_dir, scan_layers=False):
  """HF T5 directory -> a t5jax checkpoint directory. Returns the T5Config."""
  from t5jax.workdir import checkpoint
  from t5jax.hf import t5 as hf

  _check_out_dir(out_dir)  # before the (possibly long) read
  params, config = hf.load_hf(hf_dir, scan_layers=scan_layers)
  meta = {
    "data_position": 0,
    "config": {"model": config.to_dict()},
    "source": {"format": "huggingface", "path": os.path.abspath(hf_dir)},
  }

  def write(tmp):
    ckpts = checkpoint.Checkpoints(os.path.join(tmp, "checkpoints"), max_to_keep=1, async_save=False)
    ckpts.save(0, {"params": params}, meta)
    ckpts.wait()
    ckpts.close()
    _write_tokenizer(hf_dir, tmp, out_dir)

  _write_atomically(out_dir, write)
  return config


def export_hf(ckpt_dir, out_dir, step=None, merge=False):
  """t5jax checkpoint directory -> config.json + model.safetensors. Returns the T5Config. A LoRA directory
  needs `merge`: its adapters are merged into their base."""
  import t5jax
  from t5jax.hf import t5 as hf

  _check_out_dir(out_dir)
  try:
    params, config = t5jax.load_checkpoint(ckpt_dir, step, merge_lora=merge)
  except ValueError as e:
    if "LoRA" not in str(e) or merge:
      raise
    raise ValueError(f"{e} with --merge, or write the adapters alone with export-peft") from None

  def write(tmp):
    hf.save_hf(params, config, tmp)
    _write_tokenizer(ckpt_dir, tmp, out_dir)

  _write_atomically(out_dir, write)
  return config


def export_peft(lora_dir, out_dir, step=None):
  """A LoRA checkpoint's adapters -> PEFT's adapter_config.json + adapter_model.safetensors. Returns the T5Config."""
  import ml_collections

  from t5jax import lora
  from t5jax.hf import peft
  from t5jax.model import T5Config
  from t5jax.workdir import checkpoint

  _check_out_dir(out_dir)
  adapters, meta = checkpoint.load_params(os.path.join(lora_dir, "checkpoints"), step)
  config = ml_collections.ConfigDict(meta["config"])
  if not lora.enabled(config):
    raise ValueError(f"{lora_dir}: not a LoRA run (config.finetune.lora.rank is 0); export-hf writes it whole")
  model_config = T5Config.from_dict(meta["config"]["model"])
  base = meta.get("lora_base", {}).get("path", config.init_from)

  def write(tmp):
    peft.save_peft(adapters, model_config, config.finetune.lora, base, tmp)
    _write_tokenizer(lora_dir, tmp, out_dir)

  _write_atomically(out_dir, write)
  return model_config


def import_peft(peft_dir, out_dir, base=None):
  """PEFT LoRA directory -> a t5jax LoRA checkpoint directory on `base`. Returns the T5Config."""
  import ml_collections

  from t5jax import loading, lora
  from t5jax.hf import peft
  from t5jax.workdir import checkpoint

  _check_out_dir(out_dir)
  peft.read_peft_config(peft_dir)
  base = base or peft.read_peft_config(peft_dir).get("base_model_name_or_path")
  if not base:
    raise ValueError(f"{peft_dir}: its adapter config names no base_model_name_or_path; pass --base")
  base = os.path.abspath(base)
  _, model_config = loading.load_checkpoint(base)
  adapters, lora_group = peft.load_peft(peft_dir, model_config)
  lora_group["base_dtype"] = "float32"
  config = {"model": model_config.to_dict(), "init_from": base, "finetune": {"lora": lora_group}}
  frozen = lora.build(ml_collections.ConfigDict(config), model_config, loading.load_params_for)
  frozen.load_arg()  # the base's hash, as a training run records it
  meta = {"data_position": 0, "config": config, "lora_base": dict(frozen.record), "source": {"format": "peft"}}

  def write(tmp):
    ckpts = checkpoint.Checkpoints(os.path.join(tmp, "checkpoints"), max_to_keep=1, async_save=False)
    ckpts.save(0, {"params": adapters}, meta)
    ckpts.wait()
    ckpts.close()
    if not _copy_tokenizer_files(peft_dir, tmp):  # PEFT directories often carry the tokenizer; else the base's
      _write_tokenizer(base, tmp, out_dir)

  _write_atomically(out_dir, write)
  return model_config


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m t5jax.convert", description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("import-hf", help="Hugging Face T5 directory -> t5jax checkpoint")
  p.add_argument("hf_dir")
  p.add_argument("out_dir")
  p.add_argument("--scan_layers", action="store_true", help="store params in the nn.scan layout")
  p = sub.add_parser("export-hf", help="t5jax checkpoint (converted dir or workdir) -> Hugging Face T5")
  p.add_argument("ckpt_dir")
  p.add_argument("out_dir")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--merge", action="store_true", help="a LoRA run: write its base with the adapters merged in")
  p = sub.add_parser("export-peft", help="a LoRA run's adapters -> Hugging Face PEFT adapter directory")
  p.add_argument("ckpt_dir")
  p.add_argument("out_dir")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p = sub.add_parser("import-peft", help="Hugging Face PEFT LoRA adapter -> t5jax LoRA checkpoint")
  p.add_argument("peft_dir")
  p.add_argument("out_dir")
  p.add_argument("--base", default=None, help="the base model (default: the adapter config's base_model_name_or_path)")
  parser.add_argument("--debug", action="store_true", help="show an error's traceback instead of one line")
  parser.add_argument("--verbose", action="store_true", help="show the libraries' INFO logs")
  args = parser.parse_args(argv)
  if not args.verbose:
    cli.quiet_library_logs()
  try:
    if args.command == "import-hf":
      config = import_hf(args.hf_dir, args.out_dir, args.scan_layers)
    elif args.command == "export-hf":
      config = export_hf(args.ckpt_dir, args.out_dir, args.step, args.merge)
    elif args.command == "export-peft":
      config = export_peft(args.ckpt_dir, args.out_dir, args.step)
    else:
      config = import_peft(args.peft_dir, args.out_dir, args.base)
  except cli.EXPECTED as e:
    if args.debug or cli.debugging():
      raise
    print(f"t5jax.convert: error: {cli.one_line(e)}", file=sys.stderr, flush=True)
    return 1
  except KeyboardInterrupt:
    if args.debug or cli.debugging():
      raise
    print(f"t5jax.convert: error: interrupted; {args.out_dir} was not written", file=sys.stderr, flush=True)
    return 130
  print(
    f"{args.command}: wrote {args.out_dir} (d_model={config.d_model}, layers="
    f"{config.num_encoder_layers}/{config.num_decoder_layers}, vocab={config.vocab_size}, "
    f"{'tied' if config.tie_word_embeddings else 'untied'} {config.feed_forward_proj})",
    flush=True,
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
