"""Evaluation on decoded text: T5's text metrics, and a model's per-task scores on a task mixture.

Metrics (T5's, on a 0-100 scale): exact_match and accuracy, bleu (sacrebleu), rouge (rouge-score: rouge1,
rouge2, rougeLsum F-measures), pearson and spearman (stsb, on the floats parsed from the text). Each is
(targets, predictions) -> {name: value}, on texts the task has postprocessed (stsb: floats).
"""

import numpy as np

from t5jax import decode
from t5jax.data import loader, mixtures, packing


def exact_match(targets, predictions):
  return {"exact_match": 100.0 * float(np.mean([t == p for t, p in zip(targets, predictions, strict=True)]))}


def accuracy(targets, predictions):
  return {"accuracy": exact_match(targets, predictions)["exact_match"]}


def bleu(targets, predictions):
  import sacrebleu

  # T5's settings: 13a tokenization, exponential smoothing, case-sensitive.
  return {"bleu": sacrebleu.corpus_bleu(predictions, [targets], smooth_method="exp", tokenize="13a").score}


def rouge(targets, predictions):
  from rouge_score import rouge_scorer, scoring

  types = ("rouge1", "rouge2", "rougeLsum")
  scorer = rouge_scorer.RougeScorer(types, use_stemmer=True)
  agg = scoring.BootstrapAggregator()
  for t, p in zip(targets, predictions, strict=True):
    # rougeLsum splits summaries into sentences on newlines, as T5 prepares them.
    agg.add_scores(scorer.score(t.replace(". ", ".\n"), p.replace(". ", ".\n")))
  result = agg.aggregate()
  return {k: 100.0 * result[k].mid.fmeasure for k in types}


def _correlation(kind, targets, predictions):
  from scipy import stats

  t, p = np.asarray(targets, np.float64), np.asarray(predictions, np.float64)
  if np.std(p) == 0 or np.std(t) == 0:
    return 0.0  # constant predictions: correlation undefined; report none rather than NaN
  fn = stats.pearsonr if kind == "pearson" else stats.spearmanr
  return 100.0 * float(fn(t, p)[0])


def pearson(targets, predictions):
  return {"pearson": _correlation("pearson", targets, predictions)}


def spearman(targets, predictions):
  return {"spearman": _correlation("spearman", targets, predictions)}


METRICS = {
  "exact_match": exact_match,
  "accuracy": accuracy,
  "bleu": bleu,
  "rouge": rouge,
  "pearson": pearson,
  "spearman": spearman,
}


def compute_metrics(names, targets, predictions):
  out = {}
  for name in names:
    if name not in METRICS:
      raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(sorted(METRICS))}")
    out.update(METRICS[name](targets, predictions))
  return out


def _until_eos(ids, eos_id):
  ids = list(ids)
  return ids[: ids.index(eos_id)] if eos_id in ids else ids


def evaluate_tasks(model, params, data, *, num_examples=64, batch_size=64):
  """{task name: {metric: value}} for every task of `data` (a mixtures.TaskData), on the first
  `num_examples` records of each validation split, decoded greedily."""
  tok = data.tokenizer
  results = {}
  for i, (task, source) in enumerate(zip(data.tasks, data.eval_sources, strict=True)):
    n = min(num_examples, len(source))
    tokenize = mixtures.Tokenize(task, i, tok, data.inputs_length, data.targets_length)
    examples = [tokenize(source[j]) for j in range(n)]
    targets, predictions = [], []
    for s in range(0, n, batch_size):
      chunk = examples[s : s + batch_size]
      inputs = packing.pad_examples([(x, y) for _, x, y in chunk], data.inputs_length, data.targets_length)[
        "encoder_input_tokens"
      ]
      out = np.asarray(
        decode.generate(model, params, inputs, inputs != 0, max_new_tokens=data.targets_length, eos_id=tok.eos_id)
      )
      predictions += [tok.decode(_until_eos(row, tok.eos_id)) for row in out]
      targets += [tok.decode(_until_eos(y, tok.eos_id)) for _, _, y in chunk]
    post = task.postprocess or (lambda x: x)
    results[task.name] = compute_metrics(task.metrics, [post(t) for t in targets], [post(p) for p in predictions])
  return results


def evaluate_captions(model, params, data):
  """{"captions": {"exact_match": %, "num_examples": n}}: every held-out video of `data` (a
  video_dataset.VideoData) captioned greedily from its centred clip."""
  import jax  # pylint: disable=import-outside-toplevel
  from t5jax.model.video import INPUTS, greedy_captions  # pylint: disable=import-outside-toplevel

  tok, n = data.tokenizer, len(data.eval_examples)
  run = jax.jit(lambda p, inputs: greedy_captions(model, p, inputs, data.targets_length))
  predictions, step = [], 0
  while len(predictions) < n:  # eval batch s holds held-out videos [s * rows, (s + 1) * rows), wrapping
    batch = data.eval[step]
    loader.take_failed_reads(batch)  # named in a warning; its replacement is scored against the caption it replaced
    out = np.asarray(run(params, {k: batch[k] for k in INPUTS if k in batch}))
    predictions += [tok.decode(_until_eos(row, tok.eos_id)) for row in out]
    step += 1
  targets = [caption for _, caption in data.eval_examples]
  return {"captions": dict(exact_match(targets, predictions[:n]), num_examples=n)}


def continuation_examples(chunks, inputs_length, num_tokens, mode_id=None, sentinel_id=None):
  """(inputs int32[n, inputs_length], continuations int32[n, num_tokens]) from held-out token rows: each row's
  first tokens as a prefix (after `mode_id`, UL2's [S2S], when given; then `sentinel_id`, T5's <extra_id_0>,
  when given; then EOS) and its next `num_tokens`."""
  chunks = np.asarray(chunks)
  start = int(mode_id is not None)
  prefix = min(inputs_length - 1 - start - (sentinel_id is not None), chunks.shape[1] - num_tokens)
  if prefix < 1:
    raise ValueError(f"held-out rows of {chunks.shape[1]} tokens leave no prefix before {num_tokens} to continue")
  inputs = np.zeros((len(chunks), inputs_length), np.int32)
  inputs[:, :start] = mode_id or 0
  inputs[:, start : start + prefix] = chunks[:, :prefix]
  tail = [sentinel_id, 1] if sentinel_id is not None else [1]  # EOS, as the S-denoiser's inputs end
  inputs[:, start + prefix : start + prefix + len(tail)] = tail
  return inputs, chunks[:, prefix : prefix + num_tokens].astype(np.int32)


# How a model is asked to continue text: prefix_lm as UL2's S-denoiser trains ([S2S] + prefix + EOS; no mode
# token for a tokenizer without one), sentinel as T5 asks a span-corruption model (prefix + <extra_id_0> + EOS:
# it answers <extra_id_0> first, then the missing text, so its first decoded token is not scored).
CONTINUATION_PROMPTS = ("prefix_lm", "sentinel")


def evaluate_continuations(model, params, data, *, num_tokens=32, num_examples=64, batch_size=64, prompt="prefix_lm"):
  """{"continuation": {"token_accuracy", "exact_match", "num_examples"}}: greedy continuations of the first
  `num_examples` held-out rows of `data` (pretraining.PretrainingData), asked for as `prompt` says
  (CONTINUATION_PROMPTS), scored on their next `num_tokens` tokens: the share of positions predicted right, and
  of rows whose whole `num_tokens` come out right (0-100)."""
  if prompt not in CONTINUATION_PROMPTS:
    raise ValueError(f"config.continuation_prompt={prompt!r}; choose one of {CONTINUATION_PROMPTS}")
  tok = data.tokenizer
  chunks = data.eval_chunks[:num_examples]
  sentinel = prompt == "sentinel"
  mode_id = None if sentinel else tok.user_pieces.get("[S2S]")
  inputs, truth = continuation_examples(
    chunks, data.inputs_length, num_tokens, mode_id, tok.sentinel_id(0) if sentinel else None
  )
  out = []
  for s in range(0, len(inputs), batch_size):
    batch = inputs[s : s + batch_size]
    # Never stopped early: the held-out text runs on, so the model is scored on all num_tokens positions.
    new = num_tokens + sentinel
    out.append(np.asarray(decode.generate(model, params, batch, batch != 0, max_new_tokens=new, eos_id=None)))
  right = np.concatenate(out)[:, int(sentinel) :] == truth
  return {
    "continuation": {
      "token_accuracy": 100.0 * float(right.mean()),
      "exact_match": 100.0 * float(right.all(axis=1).mean()),
      "num_examples": len(truth),
    }
  }


def flat_scalars(results):
  """{task: {metric: v}} -> {"decode_<task>_<metric>": v} for metrics.jsonl / TensorBoard."""
  return {f"decode_{task}_{name}": float(v) for task, m in results.items() for name, v in m.items()}
