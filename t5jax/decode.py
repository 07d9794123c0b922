"""Generation from a T5: greedy, temperature / top-k / top-p sampling and beam search, jitted, with a KV cache.

  tokens = generate(model, params, input_ids, strategy="beam", num_beams=4, max_new_tokens=32)
  for tokens in stream(model, params, input_ids, max_new_tokens=32): ...   # one [batch] array per step

Every strategy encodes the batch once, caches each layer's cross-attention keys/values (`init_cache`), then
runs one `lax.while_loop` of one-token cached decoder steps inside a single `jax.jit`. Outputs are int32
[batch * num_return_sequences, max_new_tokens]: row `b * num_return_sequences + r` is the r-th sequence for
input b; a finished row holds 0 (pad) after its EOS.

`min_length` counts new tokens (HF's `min_new_tokens`): EOS cannot be chosen before it.

Beam search follows transformers' bookkeeping (2 * num_beams candidates per step; the best num_beams that
do not end stay alive; candidates among the best num_beams that end join a pool of num_beams finished
hypotheses). Two details differ between T5X and transformers and are options here:
  - length penalty (`length_penalty_style`): T5X divides the log-prob by ((5 + len) / 6) ** alpha, HF by
    len ** alpha (len = new tokens including EOS);
  - stopping (`early_stopping`): T5X runs until no alive beam, scored at the longest possible length, can
    beat the worst finished one: HF's early_stopping="never". HF's default False scores alive beams at
    their current length; True stops once num_beams hypotheses have finished.
The defaults are T5X's (style "t5x", alpha 0.6, "never"); style "hf" with HF's flags reproduces
`transformers` `generate()` token for token (tests/test_decode.py).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from t5jax.model import T5

STRATEGIES = ("greedy", "sample", "beam")
NEG = -1.0e9  # "impossible" score, as transformers uses, so that sums with it stay finite


def init_cache(config, params, encoded, encoder_attention_mask, max_decode_len):
  """A decoding cache for a batch of `encoded.shape[0]` sequences of up to `max_decode_len` tokens: empty
  self-attention slots, and each layer's cross-attention keys/values of `encoded`, projected once here.

  Then, per step (token: [batch, 1]):
    logits, mut = model.apply({"params": params, "cache": cache}, encoded, encoder_attention_mask, token,
                              decode=True, method=T5.decode, mutable=["cache"])
    cache = mut["cache"]
  """
  batch = encoded.shape[0]

  def make(params):
    dummy = jnp.zeros((batch, max_decode_len), jnp.int32)
    _, variables = T5(config).apply(
      {"params": params}, encoded, encoder_attention_mask, dummy, decode=True, method=T5.decode, mutable=["cache"]
    )
    return variables["cache"]

  # Under jit only the cross-attention projections survive: the dummy tokens' logits and the self-attention
  # work feed no output (their caches are fresh zeros), so XLA removes them.
  return jax.jit(make)(params)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The static (compile-time) decoding settings; build with `settings(...)`, which validates them."""

  strategy: str = "greedy"
  max_new_tokens: int = 64
  num_beams: int = 1
  temperature: float = 1.0
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1.0 = off
  num_return_sequences: int = 1
  min_length: int = 0  # new tokens before EOS is allowed
  eos_id: int | None = 1  # None = never stop early
  length_penalty: float = 0.6  # alpha
  length_penalty_style: str = "t5x"
  early_stopping: bool | str = "never"


def settings(**options):
  """A validated `Settings`; every mistake is a one-line ValueError naming the argument."""
  s = Settings(**options)
  if s.strategy not in STRATEGIES:
    raise ValueError(f"unknown strategy {s.strategy!r}; expected one of {STRATEGIES}")
  if s.num_beams < 1 or s.max_new_tokens < 1 or s.num_return_sequences < 1 or s.min_length < 0:
    raise ValueError("num_beams, max_new_tokens and num_return_sequences must be >= 1, min_length >= 0")
  if s.num_beams > 1 and s.strategy != "beam":
    raise ValueError(
      f"num_beams={s.num_beams} needs strategy='beam' (beam search with sampling is not "
      f"supported; strategy was {s.strategy!r})"
    )
  if s.strategy == "beam" and s.num_return_sequences > s.num_beams:
    raise ValueError(f"num_return_sequences={s.num_return_sequences} exceeds num_beams={s.num_beams}")
  if s.strategy == "greedy" and s.num_return_sequences > 1:
    raise ValueError(
      "num_return_sequences > 1 with greedy decoding would repeat one sequence; use strategy='sample' or 'beam'"
    )
  if s.strategy == "sample":
    if s.temperature <= 0:
      raise ValueError(f"temperature must be > 0 for sampling (use strategy='greedy'), got {s.temperature}")
    if s.top_k < 0 or not 0.0 < s.top_p <= 1.0:
      raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={s.top_k}, top_p={s.top_p}")
  if s.length_penalty_style not in ("t5x", "hf"):
    raise ValueError(f"length_penalty_style must be 't5x' or 'hf', got {s.length_penalty_style!r}")
  if s.early_stopping not in (True, False, "never"):
    raise ValueError(f"early_stopping must be True, False or 'never', got {s.early_stopping!r}")
  return s


# ---------------------------------------------------------------------------------------------------------
# Pieces shared by the strategies.


def _encode(config, params, input_ids, attention_mask, copies):
  """Encodes once, then repeats each row `copies` times (beams / return sequences share the encoding)."""
  encoded = T5(config).apply({"params": params}, input_ids, attention_mask, method=T5.encode)
  return jnp.repeat(encoded, copies, axis=0), jnp.repeat(attention_mask, copies, axis=0)


def _decoder_step(config, params, cache, encoded, mask, token):
  """One cached decoder step: token [n] -> float32 logits [n, vocab] and the updated cache."""
  logits, mut = T5(config).apply(
    {"params": params, "cache": cache}, encoded, mask, token[:, None], decode=True, method=T5.decode, mutable=["cache"]
  )
  return logits[:, 0], mut["cache"]


def _forbid_early_eos(scores, step, s):
  """EOS gets -inf until `min_length` new tokens exist (it is already chosen at step min_length)."""
  if s.eos_id is None or s.min_length == 0:
    return scores
  return scores.at[:, s.eos_id].set(jnp.where(step < s.min_length, -jnp.inf, scores[:, s.eos_id]))


def _sample(logits, rng, s):
  """Temperature, then top-k, then top-p (the smallest set of tokens holding top_p of the mass)."""
  logits = logits / s.temperature
  if s.top_k > 0:
    kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    drop_sorted = mass_before >= s.top_p  # the most likely token always stays (mass before it is 0)
    drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
    logits = jnp.where(drop, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------------------
# Greedy and sampling: one token per row per step. `stream` runs the same step function from Python.


def _token_init(config, params, input_ids, attention_mask, rng, s):
  encoded, mask = _encode(config, params, input_ids, attention_mask, s.num_return_sequences)
  n = encoded.shape[0]
  state = dict(
    step=jnp.zeros((), jnp.int32),
    token=jnp.zeros((n,), jnp.int32),  # 0 = decoder start token
    done=jnp.zeros((n,), jnp.bool_),
    out=jnp.zeros((n, s.max_new_tokens), jnp.int32),
    cache=init_cache(config, params, encoded, mask, s.max_new_tokens),
    rng=rng,
  )
  return encoded, mask, state


def _token_step(config, params, encoded, mask, state, s):
  logits, cache = _decoder_step(config, params, state["cache"], encoded, mask, state["token"])
  logits = _forbid_early_eos(logits, state["step"], s)
  if s.strategy == "greedy":
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  else:  # fold_in by step: the streamed and the looped runs draw the same numbers
    token = _sample(logits, jax.random.fold_in(state["rng"], state["step"]), s)
  token = jnp.where(state["done"], 0, token)
  done = state["done"] if s.eos_id is None else state["done"] | (token == s.eos_id)
  out = jax.lax.dynamic_update_slice(state["out"], token[:, None], (0, state["step"]))
  return dict(step=state["step"] + 1, token=token, done=done, out=out, cache=cache, rng=state["rng"])


def _token_loop(config, params, input_ids, attention_mask, rng, s):
  encoded, mask, state = _token_init(config, params, input_ids, attention_mask, rng, s)
  state = jax.lax.while_loop(
    lambda st: (st["step"] < s.max_new_tokens) & ~jnp.all(st["done"]),
    lambda st: _token_step(config, params, encoded, mask, st, s),
    state,
  )
  return state["out"]


# ---------------------------------------------------------------------------------------------------------
# Beam search.


def _length_penalty(length, s):
  length = jnp.asarray(length, jnp.float32)
  if s.length_penalty_style == "t5x":
    return ((5.0 + length) / 6.0) ** s.length_penalty
  return length**s.length_penalty


def _gather_cache(cache, flat_index, scanned):
  """Reorders the self-attention key/value caches to the surviving beams' rows. Cross-attention caches stay:
  a beam only ever moves within its own example, whose rows hold the same encoder keys/values."""

  def gather(path, x):
    if getattr(path[-1], "key", None) in ("cached_key", "cached_value"):
      return jnp.take(x, flat_index, axis=1 if scanned else 0)
    return x

  return jax.tree_util.tree_map_with_path(gather, cache)


def _keep_finished(st, seqs, top_scores, ends, t, s, take):
  """Candidates among the best k that end compete with the finished beams for the k finished slots,
  length-penalised. Returns the new (finished, finished_scores, finished_ok)."""
  k = st["finished_scores"].shape[1]
  new_done = ends & (jnp.arange(2 * k) < k)[None]
  fin_cand = top_scores / _length_penalty(t + 1, s)
  if s.early_stopping is True:
    fin_cand += jnp.all(st["finished_ok"], axis=-1, keepdims=True) * NEG
  fin_cand += ~st["improvable"] * NEG + ~new_done * NEG
  pool = jax.lax.top_k(jnp.concatenate([st["finished_scores"], fin_cand], axis=1), k)[1]
  return (
    take(jnp.concatenate([st["finished"], seqs], axis=1), pool),
    take(jnp.concatenate([st["finished_scores"], fin_cand], axis=1), pool),
    take(jnp.concatenate([st["finished_ok"], new_done], axis=1), pool),
  )


def _beam_start(cache, batch, k, length):
  """The beam search's loop state before its first step."""
  return dict(
    step=jnp.zeros((), jnp.int32),
    going=jnp.array(True),
    cache=cache,
    alive=jnp.zeros((batch, k, length), jnp.int32),
    # Only beam 0 starts alive: the others would duplicate it.
    alive_scores=jnp.tile(jnp.array([0.0] + [NEG] * (k - 1), jnp.float32), (batch, 1)),
    finished=jnp.zeros((batch, k, length), jnp.int32),
    finished_scores=jnp.full((batch, k), NEG),
    finished_ok=jnp.zeros((batch, k), jnp.bool_),
    improvable=jnp.ones((batch, 1), jnp.bool_),  # can an alive beam still beat the finished ones?
  )


def _beam_loop(config, params, input_ids, attention_mask, s):
  batch, k, length = input_ids.shape[0], s.num_beams, s.max_new_tokens
  encoded, mask = _encode(config, params, input_ids, attention_mask, k)
  take = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)
  state = _beam_start(init_cache(config, params, encoded, mask, length), batch, k, length)

  def body(st):
    t = st["step"]
    token = st["alive"][:, :, jnp.maximum(t - 1, 0)].reshape(-1) * (t > 0)
    logits, cache = _decoder_step(config, params, st["cache"], encoded, mask, token)
    logp = _forbid_early_eos(jax.nn.log_softmax(logits, axis=-1), t, s)
    vocab = logp.shape[-1]
    cand = (logp.reshape(batch, k, vocab) + st["alive_scores"][:, :, None]).reshape(batch, k * vocab)
    top_scores, top_index = jax.lax.top_k(cand, 2 * k)  # [batch, 2k]
    source, token = top_index // vocab, (top_index % vocab).astype(jnp.int32)
    seqs = take(st["alive"], source)
    seqs = jax.lax.dynamic_update_slice(seqs, token[:, :, None], (0, 0, t))
    ends = jnp.broadcast_to(t + 1 >= length, token.shape)  # the last step ends every candidate
    if s.eos_id is not None:
      ends = ends | (token == s.eos_id)

    # The best k candidates that do not end stay alive.
    alive_cand = top_scores + ends * NEG
    keep = jax.lax.top_k(alive_cand, k)[1]
    alive, alive_scores = take(seqs, keep), take(alive_cand, keep)
    flat = (jnp.arange(batch)[:, None] * k + take(source, keep)).reshape(-1)

    finished, finished_scores, finished_ok = _keep_finished(st, seqs, top_scores, ends, t, s, take)

    # Could the best alive beam still beat the worst finished one? It is scored at the longest possible
    # length ("never" with alpha > 0) or at its current one.
    best_len = length if (s.early_stopping == "never" and s.length_penalty > 0) else t + 1
    best_alive = alive_scores[:, :1] / _length_penalty(best_len, s)
    worst = jnp.where(finished_ok, jnp.min(finished_scores, axis=1, keepdims=True), NEG)
    improvable = st["improvable"] & jnp.any(best_alive > worst, axis=-1, keepdims=True)
    going = jnp.any(improvable) & ~jnp.all(ends)
    if s.early_stopping is True:
      going &= ~jnp.all(finished_ok)
    return dict(
      step=t + 1,
      going=going,
      cache=_gather_cache(cache, flat, config.scan_layers),
      alive=alive,
      alive_scores=alive_scores,
      finished=finished,
      finished_scores=finished_scores,
      finished_ok=finished_ok,
      improvable=improvable,
    )

  state = jax.lax.while_loop(lambda st: st["going"], body, state)
  return state["finished"][:, : s.num_return_sequences].reshape(-1, length)


@functools.partial(jax.jit, static_argnames=("config", "s"))
def _generate_jit(config, params, input_ids, attention_mask, rng, s):
  if s.strategy == "beam":
    return _beam_loop(config, params, input_ids, attention_mask, s)
  return _token_loop(config, params, input_ids, attention_mask, rng, s)


def _inputs(input_ids, attention_mask):
  input_ids = jnp.asarray(input_ids, jnp.int32)
  if input_ids.ndim != 2:
    raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
  mask = input_ids != 0 if attention_mask is None else jnp.asarray(attention_mask) != 0
  return input_ids, mask.astype(jnp.int32)


def generate(model, params, input_ids, attention_mask=None, *, rng=None, **options):
  """Decodes a padded batch. input_ids [batch, len] (0 = padding unless `attention_mask` says otherwise).

  `options` are the fields of `Settings` (strategy, max_new_tokens, num_beams, temperature, top_k, top_p,
  num_return_sequences, min_length, eos_id, length_penalty, length_penalty_style, early_stopping), with its
  defaults. Returns int32 [batch * num_return_sequences, max_new_tokens], 0 after each row's EOS. Beam search
  returns each input's best `num_return_sequences` hypotheses, best first. `rng` (a jax key; default key(0))
  seeds sampling. Compiles once per (model config, settings, batch shape).
  """
  s = settings(**options)
  input_ids, mask = _inputs(input_ids, attention_mask)
  rng = jax.random.key(0) if rng is None else rng
  return _generate_jit(model.config, params, input_ids, mask, rng, s)


@functools.partial(jax.jit, static_argnames=("config", "s"))
def _stream_init(config, params, input_ids, attention_mask, rng, s):
  return _token_init(config, params, input_ids, attention_mask, rng, s)


@functools.partial(jax.jit, static_argnames=("config", "s"), donate_argnames=("state",))
def _stream_step(config, params, encoded, mask, state, s):
  return _token_step(config, params, encoded, mask, state, s)


def stream(model, params, input_ids, attention_mask=None, *, tokenizer=None, rng=None, **options):
  """Yields each step's new tokens as they are decoded: numpy int32 [batch * num_return_sequences] (0 for
  rows already finished), or with a `tokenizer` a list of new text pieces, one per row ("" while a row's
  text has not grown, e.g. inside a multi-byte character).

  Greedy and sampling only (a beam's history can change at every step); `options` as for `generate`. The
  tokens are those of `generate` with the same arguments: both run the same step function, here jitted
  alone and looped in Python, stopping once every row has ended.
  """
  if options.get("strategy") == "beam":
    raise ValueError("stream() supports strategy='greedy' or 'sample'; beam search rewrites earlier tokens")
  s = settings(**options)
  input_ids, mask = _inputs(input_ids, attention_mask)
  rng = jax.random.key(0) if rng is None else rng
  encoded, mask, state = _stream_init(model.config, params, input_ids, mask, rng, s)
  history = [[] for _ in range(encoded.shape[0])]
  texts = [""] * len(history)
  for _ in range(s.max_new_tokens):
    state = _stream_step(model.config, params, encoded, mask, state, s)
    tokens = np.asarray(state["token"])
    if tokenizer is None:
      yield tokens
    else:
      pieces = []
      for row, token in enumerate(tokens):
        history[row].append(int(token))
        text = tokenizer.decode(history[row])
        # Decoding the whole prefix keeps pieces right across multi-piece words and byte runs.
        piece = text[len(texts[row]) :] if text.startswith(texts[row]) else ""
        texts[row] = text if text.startswith(texts[row]) else texts[row]
        pieces.append(piece)
      yield pieces
    if bool(np.all(np.asarray(state["done"]))):
      return
