r"""UL2 pretraining: the mixture of denoisers (R, X, S) with mode tokens, on the embedded corpus.

  python -m t5jax.train --config=configs/ul2.py --workdir=/tmp/t5jax_ul2
  python -m t5jax.train --config=configs/ul2.py:t5.1.1-small --workdir=/tmp/t5jax_ul2_small
  python -m t5jax.train --config=configs/ul2.py --config.data.kind=prefix_lm --workdir=/tmp/t5jax_plm

configs/base.py's tiny model, pretrained on UL2's seven denoisers (t5jax/data/denoisers.py, docs/ul2.md) at the
paper's rates; each rate is `data.ul2.denoisers.NAME.rate`. The tokenizer trained for it holds the mode tokens
[NLU], [NLG] and [S2S] as pieces 3, 4 and 5, so `predict --input="[S2S] ..."` asks for a continuation.
kind=prefix_lm trains the S-denoiser alone (continuation training). With 128 encoder tokens the decoder reads
127 (the r = 0.5 X-denoisers' targets; span corruption's is 29), and a mu = 64 denoiser makes one span per row.
"""

import ml_collections

from configs import base
from t5jax.data.denoisers import UL2_DENOISERS


def get_config(arg=None):
  c = base.get_config(arg)
  c.data.kind = "ul2"  # ul2 | prefix_lm (the S-denoiser alone)
  c.data.ul2 = ml_collections.ConfigDict(
    dict(
      mode_tokens=True,  # prepend [NLU] / [NLG] / [S2S] (Section 3.1.3's mode switching)
      denoisers=ml_collections.ConfigDict(
        {
          name: dict(objective=objective, mode=mode, mean_span=mean_span, noise_density=density, rate=rate)
          for name, (objective, mode, mean_span, density, rate) in UL2_DENOISERS.items()
        }
      ),
    )
  )
  c.continuation_tokens = 32  # evaluate: greedy continuations of held-out text, scored on their first N tokens
  # prefix_lm: [S2S] + prefix + EOS, as the S-denoiser trains; sentinel: prefix + <extra_id_0> + EOS, T5's way
  # to ask a span-corruption model (evaluate a span run's workdir with this config, data.ul2.mode_tokens=False)
  c.continuation_prompt = "prefix_lm"
  return c
