r"""Converts T5 checkpoints between Hugging Face and t5jax layouts.

  python -m t5jax.convert import-hf HF_DIR OUT_DIR [--scan_layers]   # -> OUT_DIR/checkpoints/0/ (+ spiece.model)
  python -m t5jax.convert export-hf CKPT_DIR OUT_DIR [--step N]      # -> OUT_DIR/config.json + model.safetensors
                                                                     #    (+ spiece.model, tokenizer*.json)

An imported directory is laid out like a training workdir (`checkpoints/0/` with items state={"params"} and
meta={"config": {"model": ...}, "source": ...}), so `t5jax.from_pretrained`, `export-hf` and train.py's
`--config.init_from` read it like any run. CKPT_DIR may be such a directory or a training workdir (its
latest step unless --step). OUT_DIR must not exist or be empty; it appears only once complete.
Both carry the tokenizer: export-hf writes a training workdir's as transformers' AutoTokenizer loads it, and
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


def export_hf(ckpt_dir, out_dir, step=None):
  """t5jax checkpoint directory -> config.json + model.safetensors. Returns the T5Config."""
  import t5jax
  from t5jax.hf import t5 as hf

  _check_out_dir(out_dir)
  params, config = t5jax.load_checkpoint(ckpt_dir, step)

  def write(tmp):
    hf.save_hf(params, config, tmp)
    _write_tokenizer(ckpt_dir, tmp, out_dir)

  _write_atomically(out_dir, write)
  return config


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
  parser.add_argument("--debug", action="store_true", help="show an error's traceback instead of one line")
  parser.add_argument("--verbose", action="store_true", help="show the libraries' INFO logs")
  args = parser.parse_args(argv)
  if not args.verbose:
    cli.quiet_library_logs()
  try:
    if args.command == "import-hf":
      config = import_hf(args.hf_dir, args.out_dir, args.scan_layers)
    else:
      config = export_hf(args.ckpt_dir, args.out_dir, args.step)
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
