#!/usr/bin/env bash
# Downloads, on a machine with PyPI, the wheels that a lent GPU machine's image lacks, for benchmarks/gpu_check.sh.
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # DIR defaults to wheels/ at the repository root (git-ignored)
#
# The GPU image (Python 3.12, jax + CUDA plugin, flax, optax, orbax, torch, transformers, tensorboard, etils)
# reaches no registry, so what t5jax needs beyond it travels as wheels beside the working tree, within the
# device tool's 64 MiB for tree and wheels together: the script prints the total. Left out on purpose, as the
# check never imports them: tensorflow-datasets (read lazily, only for TFDS data), gcsfs (gs:// only),
# sacrebleu, rouge-score and matplotlib (evaluation metrics and plots, imported lazily).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:-$HERE/wheels}"
PIP="${PIP:-$HERE/.venv/bin/pip}"
[[ -x "$PIP" ]] || PIP="python3 -m pip"

# requirements.txt's pins where it pins them; portpicker's is this checkout's venv's. grain needs array_record,
# cloudpickle, portpicker and psutil, ml_collections PyYAML: the image has all but array_record and portpicker
# (its package list, read 2026-11-17, also has pytest, pluggy, iniconfig and pytest-xdist for the smoke tests).
# decord 0.6.0 is a py3-none wheel (ctypes over its own libdecord.so), so it serves 3.12 too; it stands in for
# requirements.txt's decord2 3.4.0 (same API; video.py handles both) because decord2's cp312 wheel (26.6 MB) with
# av's (35.8 MB) comes to 67,051,421 bytes of wheels, over the 64 MiB before the tree (measured 2026-12-08).
PACKAGES=(
  ml_collections==1.1.0
  grain==0.2.18
  array_record==0.8.6
  portpicker==1.6.0
  tensorboardX==2.6.5
  decord==0.6.0
  av==18.1.0
)

mkdir -p "$DIR"
# Each platform tag a package may publish under for glibc x86_64 (manylinux2014 = manylinux_2_17).
$PIP download --quiet --python-version 3.12 --implementation cp --only-binary=:all: --no-deps \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_28_x86_64 --platform manylinux2010_x86_64 --platform any -d "$DIR" "${PACKAGES[@]}"
ls -l "$DIR"
echo "wheels: $(du -cb "$DIR"/*.whl | tail -1 | cut -f1) bytes in $DIR (the device tool carries 67108864 with the tree)"
