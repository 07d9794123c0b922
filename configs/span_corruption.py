r"""C4-style span-corruption pretraining: TFDS c4/en when a data_dir is given, else
the embedded corpus (with a warning).

  python -m t5jax.train --config=configs/span_corruption.py --workdir=/tmp/t5jax_c4 \
      --config.data.source.data_dir=~/tensorflow_datasets     # c4/en prepared there as ArrayRecord
  python -m t5jax.train --config=configs/span_corruption.py --workdir=/tmp/t5jax_sc   # embedded corpus

T5's objective (noise density 0.15, mean span 3; 568 raw tokens -> 512 inputs / 114 targets with
`:t5.1.1-small`). c4/en is read through `tfds.data_source` (no TensorFlow); prepare it once with
`tfds build c4/en --data_dir=DIR --file_format=array_record`. The first `data.source.max_documents` documents
go through the token cache (it holds them in RAM, so raise it with care). Loader workers: data.num_workers.
"""

from configs import base


def get_config(arg=None):
  c = base.get_config(arg)
  c.data.kind = "span_corruption"
  c.data.source.tfds_name = "c4/en"  # read only when --config.data.source.data_dir is given
  c.data.source.max_documents = 1_000_000
  c.data.num_workers = 2
  return c
