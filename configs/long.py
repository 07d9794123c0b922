r"""Long inputs: span corruption at 8,192 encoder tokens with blockwise attention, on the embedded corpus.

  python -m t5jax.train --config=configs/long.py --workdir=/tmp/t5jax_long

T5.1.1-small's shape (the tokenizer's own vocabulary: 4,224 entries) reading 8,192 tokens per example: dense
attention would hold [heads, 8192, 8192] scores in every layer, blockwise holds tiles of 512 x 512
(t5jax/model/blockwise.py). The layers run in one scan with full remat, so the backward pass holds one
layer's activations at a time: at batch 1, XLA:CPU's compiled T5.1.1-small step then needs 0.99 GiB of
temporaries blockwise against 9.80 GiB dense (5.2 against 27.7 GiB unrolled without remat; docs/attention.md).
A noise density of 0.05 (T5's is 0.15) in spans of 5 tokens on average (T5's 3) keeps the targets at 513 tokens
and the spans at 85, within T5's 100 sentinels. On a 2-core CPU a step of 2 examples took about 3 minutes
(90 tokens/s; the loss went 8.88 -> 8.28 over the first two steps), measured on 2026-12-04 before the layers
were scanned and rematerialized (remat recomputes each layer's forward once more in the backward pass).
"""

from configs import base


def get_config(arg=None):
  c = base.get_config(arg or "t5.1.1-small")
  c.model.vocab_size = 4224  # the embedded tokenizer's 4,000 pieces + 100 sentinels, padded to 128
  c.model.update(attention_impl="blockwise", attention_block_q=512, attention_block_k=512)
  c.model.update(scan_layers=True, remat_policy="full")
  c.data.inputs_length = 8192
  c.data.corruption.update(noise_density=0.05, mean_noise_span_length=5.0)
  # The embedded corpus's usual 2% held out (30 KB) is under one 8,533-token chunk; 6% makes five (and leaves
  # 55 train chunks: a step of 2 sees the corpus every 28 steps).
  c.data.source.eval_percent = 6
  c.update(total_steps=200, batch_size=2, log_every=5, eval_every=100, eval_steps=2, checkpoint_every=50)
  c.optimizer.warmup_steps = 20
  return c
