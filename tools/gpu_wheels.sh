#!/usr/bin/env bash
# Download, here (where pip reaches PyPI), the wheels of updown's dependencies that the GPU machine's image lacks,
# for that machine's Python, into .whl/ (git-ignored). tools/gpu_scale_check.sh installs them there; the device
# tool's `run` carries them when its call names `.whl` in `carry`.
#
#   bash tools/gpu_wheels.sh                 # PYTHON_VERSION=3.12 (the device image's); versions from constraints.txt
#
# The device image (the device tool's KINDS.md) already has torch, pytorch-lightning, torchmetrics, h5py, numba,
# numpy, rich, PyYAML and matplotlib. It lacks jsonargparse[signatures] (with docstring-parser and typeshed-client),
# nltk (with defusedxml), platformdirs and tzdata (python-dateutil 4 needs it): about 4 MB of pure-Python wheels.
# pycocoevalcap is left out: its wheel is 104 MB, over the 64 MiB a device call carries, and its scorers need Java,
# which the image lacks; tools/gpu_scale_check.sh then times training without validation.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
PACKAGES=(jsonargparse docstring-parser typeshed-client nltk defusedxml platformdirs tzdata)

pins=()
for name in "${PACKAGES[@]}"; do
    # constraints.txt spells some names with '_' (typeshed_client); pip treats '-', '_' and '.' alike.
    pin=$(grep -i -E "^${name//-/[-_.]}==" constraints.txt) || { echo "constraints.txt pins no $name" >&2; exit 1; }
    pins+=("$pin")
done
rm -rf .whl
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
ls -1 .whl
du -sh .whl
