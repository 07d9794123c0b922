r"""Decode text with any T5 we can load, or caption videos with a video run (the CLI over `t5jax/inference.py`).

  python -m t5jax.predict --checkpoint=DIR --input="translate English to German: hello"
  python -m t5jax.predict --checkpoint=DIR --input_file=in.txt --output_file=out.txt --strategy=beam --num_beams=4
  python -m t5jax.predict --checkpoint=VIDEO_WORKDIR --video=clip.mp4      (or --input_file=videos.txt)

DIR is a t5jax training workdir, a `t5jax.convert import-hf` directory or a Hugging Face T5 directory.
Input files: .txt (one input per line; one output line each, several return sequences joined by a tab)
or .jsonl (an "input" field per record; each record is written back with a "prediction" field).
A video model (trained with configs/video.py) reads video paths instead of texts, each clip sampled as its
run's evaluation samples it, and captions them greedily.
An empty input gives an empty output, without running the model. An input longer than --max_input_length
tokens is truncated (keeping its EOS) with a warning, or is an error with --strict.
"""

import json
import sys

from absl import flags

from t5jax import cli

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "t5jax workdir, converted dir, or Hugging Face T5 dir.")
_INPUT = flags.DEFINE_string("input", None, "One input text (output goes to stdout unless --output_file).")
_INPUT_FILE = flags.DEFINE_string(
  "input_file", None, ".txt (one input per line) or .jsonl ('input' field); video paths for a video model."
)
_VIDEO = flags.DEFINE_string("video", None, "One video file to caption, with a video model's workdir.")
_OUTPUT_FILE = flags.DEFINE_string("output_file", None, "Where to write outputs (default: stdout).")
_STRATEGY = flags.DEFINE_enum("strategy", "greedy", ["greedy", "sample", "beam"], "Decoding strategy.")
_NUM_BEAMS = flags.DEFINE_integer("num_beams", 1, "Beams (strategy=beam only).")
_NUM_RETURN = flags.DEFINE_integer("num_return_sequences", 1, "Outputs per input (sample or beam).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens holding this mass (1 = all).")
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 0.6, "Beam search alpha in T5X's ((5+len)/6)**alpha.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most per input.")
_MAX_INPUT_LENGTH = flags.DEFINE_integer(
  "max_input_length",
  512,
  "Longer inputs (in tokens, EOS included) are truncated with a warning, or rejected with --strict.",
)
_STRICT = flags.DEFINE_boolean("strict", False, "Make an over-long input an error instead of a truncation.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Inputs decoded together.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "A t5jax workdir's checkpoint to load; default the latest.")
_STREAM = flags.DEFINE_boolean("stream", False, "Print --input's output as it is decoded (greedy or sample).")


class PredictError(ValueError):
  """A user-facing problem: printed as one line, exit status 1."""


def read_inputs(path):
  """(texts, records): records are the parsed JSONL objects (None for .txt)."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise PredictError(f"{path}: cannot read input file ({e.strerror})") from None
  except UnicodeDecodeError as e:
    raise PredictError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start : e.start + 1]!r})") from None
  if not path.endswith(".jsonl"):
    return lines, None
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise PredictError(f"{path}:{number}: not JSON ({e.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get("input"), str):
      raise PredictError(f"{path}:{number}: a JSONL record needs a string 'input' field")
    records.append(record)
  return [r["input"] for r in records], records


def stream_one(model, params, tokenizer, ids, *, rng, **decode_kwargs):
  """Writes one input's decoded text to stdout piece by piece, padded as `predict` pads (same tokens)."""
  from t5jax import decode, inference

  if ids:
    kwargs = {k: v for k, v in decode_kwargs.items() if k not in ("num_beams", "length_penalty")}  # beam-only
    for pieces in decode.stream(model, params, inference.padded([ids], 1), tokenizer=tokenizer, rng=rng, **kwargs):
      sys.stdout.write(pieces[0])
      sys.stdout.flush()
  sys.stdout.write("\n")


def _decode_kwargs():
  """The decoding flags, checked before the (slow) checkpoint load."""
  decode_kwargs = dict(
    strategy=_STRATEGY.value,
    max_new_tokens=_MAX_NEW_TOKENS.value,
    num_beams=_NUM_BEAMS.value,
    temperature=_TEMPERATURE.value,
    top_k=_TOP_K.value,
    top_p=_TOP_P.value,
    num_return_sequences=_NUM_RETURN.value,
    length_penalty=_LENGTH_PENALTY.value,
  )
  from t5jax import decode

  try:
    decode.settings(**decode_kwargs)
  except ValueError as e:
    raise PredictError(str(e)) from None
  if _STREAM.value and (
    _INPUT.value is None or _OUTPUT_FILE.value or _STRATEGY.value == "beam" or _NUM_RETURN.value != 1
  ):
    raise PredictError(
      "--stream prints one --input's output to the terminal as it is decoded: not with "
      "--input_file, --output_file, beam search or several return sequences"
    )
  return decode_kwargs


def _read_all_inputs():
  """(texts or video paths, JSONL records or None) from --input, --video or --input_file."""
  if sum(x is not None for x in (_INPUT.value, _INPUT_FILE.value or None, _VIDEO.value)) != 1:
    raise PredictError("give exactly one of --input, --video or --input_file")
  if _INPUT_FILE.value:
    return read_inputs(_INPUT_FILE.value)
  if _VIDEO.value is not None:
    return [_VIDEO.value], None
  try:
    _INPUT.value.encode("utf-8")
  except UnicodeEncodeError as e:  # the shell passed bytes that are not UTF-8 (Python keeps them escaped)
    raise PredictError(f"--input is not UTF-8 text (byte {e.start})") from None
  return [_INPUT.value], None


def _load(path):
  """(model, params, config) of --checkpoint, every failure a PredictError naming the path."""
  import t5jax

  if not path:
    raise PredictError("--checkpoint is required")
  try:
    return t5jax.from_pretrained(path, step=_STEP.value)
  except FileNotFoundError as e:
    raise PredictError(str(e) if path in str(e) else f"{path}: {e}") from None
  except Exception as e:  # unreadable or corrupt: name the path, keep the reason
    raise PredictError(f"{path}: cannot load checkpoint ({type(e).__name__}: {e})") from None


def _caption_videos(path, params, config, tokenizer, paths):
  """[[caption]] per video path: a video model, greedy as `t5jax.evaluate` (no other strategy applies)."""
  from t5jax import inference
  from t5jax.model.video import VideoT5

  if _INPUT.value is not None:
    raise PredictError(f"{path} is a video model: give --video=FILE or --input_file listing video paths")
  if _STRATEGY.value != "greedy":
    raise PredictError(f"{path} is a video model, which captions greedily: --strategy={_STRATEGY.value} is for text")
  try:
    captions = inference.caption_videos(
      VideoT5(config),
      params,
      tokenizer,
      inference.video_settings(path),
      paths,
      batch_size=_BATCH_SIZE.value,
      max_new_tokens=_MAX_NEW_TOKENS.value,
      progress=_INPUT_FILE.value is not None,
    )
  except (ValueError, FileNotFoundError) as e:
    raise PredictError(str(e)) from None
  return [[c] for c in captions]


def run(argv):
  del argv
  import jax

  from t5jax import inference

  decode_kwargs = _decode_kwargs()
  texts, records = _read_all_inputs()
  path = _CHECKPOINT.value
  model, params, config = _load(path)
  if _VIDEO.value is not None and config.video is None:
    raise PredictError(f"{path} is a text model: --video needs a video model's workdir")
  try:
    tokenizer = inference.find_tokenizer(path, config)
    encoded = (
      None
      if config.video is not None
      else inference.encode_inputs(tokenizer, texts, _MAX_INPUT_LENGTH.value, _STRICT.value)
    )
  except (ValueError, FileNotFoundError) as e:
    raise PredictError(str(e)) from None
  if config.video is not None:
    results = _caption_videos(path, params, config, tokenizer, texts)
  elif _STREAM.value:
    return stream_one(model, params, tokenizer, encoded[0], rng=jax.random.key(_SEED.value), **decode_kwargs)
  else:
    results = inference.predict(
      model,
      params,
      tokenizer,
      encoded,
      batch_size=_BATCH_SIZE.value,
      progress=_INPUT_FILE.value is not None,
      rng=jax.random.key(_SEED.value),
      **decode_kwargs,
    )
  _write(results, records)


def _write(results, records):
  """One line (or JSONL record) per input, to --output_file or stdout."""
  if records is not None:
    lines = [
      json.dumps(dict(r, prediction=out[0] if len(out) == 1 else out), ensure_ascii=False)
      for r, out in zip(records, results, strict=True)
    ]
  else:  # one line per input: a newline inside an output would break that alignment
    lines = ["\t".join(o.replace("\n", " ") for o in out) for out in results]
  text = "".join(line + "\n" for line in lines)
  if _OUTPUT_FILE.value:
    with open(_OUTPUT_FILE.value, "w", encoding="utf-8") as f:
      f.write(text)
  else:
    sys.stdout.write(text)


def main(argv):
  run(argv)


if __name__ == "__main__":
  cli.run(main, "t5jax.predict")
