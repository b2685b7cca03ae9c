#!/usr/bin/env bash
# The GPU check (docs/benchmarks.md, GPU section): cifar10 at T = 120 s and pneumoniamnist,
# orl_att_faces, sign_language_digits at T = 30 s, each with the default pipeline and with the CPU
# path forced, through `tools bench-npz` (no TensorFlow needed). About 8 minutes on one H200.
#
#   tools/gpu_check.sh prepare   # here: fill .gpu/ (weights, timm wheel, the four datasets; ~51 MB)
#   tools/gpu_check.sh run       # there: install the carried wheel, run, write $OUT (default runs/gpu)
#
# .gpu/ is ignored by git (add `/.gpu/` to .git/info/exclude) and travels as a carried folder.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_DIR="${GPU_DIR:-.gpu}"
DATASETS="${DATASETS:-cifar10=120 pneumoniamnist=30 orl_att_faces=30 sign_language_digits=30}"

prepare() {
  local shared="${AUTODL_SHARED:-../shared}" py="${PYTHON:-.venv/bin/python}"
  mkdir -p "$GPU_DIR/weights" "$GPU_DIR/whl" "$GPU_DIR/data"
  local weights
  weights="$("$py" -c 'import pretrained; print(pretrained.find_weight_file("mobilenetv2_100").path)')"
  cp "$weights" "$GPU_DIR/weights/"
  "$py" -m pip download -q --no-deps --only-binary=:all: -d "$GPU_DIR/whl" "timm==$("$py" -c 'import timm; print(timm.__version__)')"
  for item in $DATASETS; do
    local name="${item%%=*}"
    mkdir -p "$GPU_DIR/data/$name"
    cp "$shared/datasets/$name/data.npz" "$shared/datasets/$name/info.json" "$GPU_DIR/data/$name/"
  done
  du -sh "$GPU_DIR"
}

run() {
  local out="${OUT:-runs/gpu}" py="${PYTHON:-python3}" site="${SITE_DIR:-${TMPDIR:-/tmp}/autodl-gpu-site}"
  mkdir -p "$out"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$GPU_DIR"/whl/*.whl
  export PYTHONPATH="$site:$PWD" AUTODL_WEIGHTS_DIR="$PWD/$GPU_DIR/weights" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$py" -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__, "cuda", torch.cuda.is_available())'
  local args=()
  for item in $DATASETS; do args+=("$GPU_DIR/data/${item%%=*}=${item##*=}"); done
  "$py" -m tools.cli bench-npz --code-dir . --datasets "${args[@]}" --pipelines "${PIPELINES:-default,cpu-path}" \
    --out "$out/bench" 2>"$out/log.txt"
  cp "$out/bench/results.jsonl" "$out/bench/table.md" "$out/" 2>/dev/null || true
}

case "${1:-}" in
  prepare) prepare ;;
  run) run ;;
  *) sed -n 2,9p "$0"; exit 2 ;;
esac
