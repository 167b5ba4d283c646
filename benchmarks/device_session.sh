#!/usr/bin/env bash
# The open GPU checks of issues #12 (Diff-ICMH) and #13 (VLIC, quickstart), prepared for a session
# that is lent the device machine (docs/benchmarks.md records what they gave).
#
# Here, once:   bash benchmarks/device_session.sh prepare
#   the packages the device image lacks (Python 3.12 wheels) and Kodak, into .device/ (git-ignored)
# There (device `run`, carry [".device"], timeout_s 600), one part per call:
#   bash benchmarks/device_session.sh quickstart   # ≈ 5 min: `pytest -m gpu`, the quickstart on the GPU
#   bash benchmarks/device_session.sh sd21         # ≈ 7 min: Diff-ICMH and VLIC steps at SD 2.1 size, a 2K decode
# Each part writes its log to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGING=.device
WHEELS="compressai==1.2.8 diffusers==0.42.1 omegaconf==2.4.0 webdataset==1.0.2 braceexpand==0.1.7 piq==0.8.0
        pytorch-msssim==1.0.0 pytest-timeout==2.4.0"
# The stage-1 recipe under test for the GPU quickstart (≤ 5 min in all, ≥ 1 dB over JPEG on Kodak):
# a wider codec on 4× the pixels per step, as many steps as about three minutes allow, at the λ it
# was prepared with (the CPU quickstart's 0.0048 was set for its smaller codec).
GPU_STAGE1="stage1.lmbda=0.0058 stage1.codec.N=128 stage1.codec.M=192 stage1.data.crop=256 stage1.data.batch_size=16
            stage1.data.num_workers=8 stage1.trainer.max_steps=6000 stage1.trainer.val_every=6000
            stage1.trainer.checkpoint_every=2000"

case "${1:-}" in
  prepare)
    grep -qx "/$STAGING/" .git/info/exclude 2>/dev/null || echo "/$STAGING/" >> .git/info/exclude
    mkdir -p "$STAGING/wheels" "$STAGING/kodak"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$STAGING/wheels" $WHEELS
    cp ../shared/data/kodak/*.png "$STAGING/kodak/"
    du -sh "$STAGING"
    ;;
  quickstart|sd21)
    : "${OUT:?run this part on the device machine}"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$STAGING"/wheels/*.whl
    export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    if [ "$1" = quickstart ]; then
      python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" | tail -3
      start=$SECONDS
      python3 train.py quickstart workdir=/tmp/qs kodak_dir="$STAGING/kodak" $GPU_STAGE1 \
        2>&1 | tee "$OUT/quickstart.log" | grep -v "it/s]" | tail -40
      echo "quickstart on the GPU: $((SECONDS - start)) s in all"
      cp /tmp/qs/results.json "$OUT/quickstart_results.json"
    else
      python3 benchmarks/difficmh_gpu.py --images "$STAGING/kodak" --batch 2 2>&1 | tee "$OUT/difficmh.log" \
        | grep -v "it/s]" | tail -12
      python3 benchmarks/stage3_gpu.py --images "$STAGING/kodak" --batch 2 2>&1 | tee "$OUT/vlic.log" \
        | grep -v "it/s]" | tail -8
    fi
    ;;
  *)
    echo "usage: bash benchmarks/device_session.sh prepare|quickstart|sd21" >&2
    exit 2
    ;;
esac
