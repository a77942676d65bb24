#!/usr/bin/env bash
# The GPU checks of a session that is lent a CUDA machine (CI never has one), as one script:
#   1. benchmarks/gpu_checks.py: the NCCL path (ddp, ZeRO-1/2/3) against CPU PyTorch, and zo2
#      streaming (off / host / host without prefetch / nvme) bit-identical on CUDA, plus timings;
#   2. benchmarks/offload_gpu.py: the offload tier (host, nvme) bit-identical on CUDA, plus timings;
#   3. on the machine's CPU cores (CUDA hidden): `dtrain plan calibrate` for 4 processes, then
#      benchmarks/seqpar.py with that calibration (FlexSP vs static Ulysses on a quiet many-core host).
# Wheels of the dependencies the image lacks travel in .whl/ (see BENCHMARKS.md). Logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/device-out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
(nvidia-smi -L; nproc; python3 -c "import torch; print(torch.__version__)") 2>&1 | tee "$OUT/machine.log"
timeout 150 python3 benchmarks/gpu_checks.py --dir /tmp/zo2-nvme 2>&1 | tee "$OUT/gpu_checks.log"
timeout 120 python3 benchmarks/offload_gpu.py --dir /tmp/offload 2>&1 | tee "$OUT/offload_gpu.log"
export CUDA_VISIBLE_DEVICES=""
timeout 90 python3 -m dtrain.planner.cli calibrate --quick --max-degree 4 --out "$OUT/device_cpu.toml" 2>&1 | tee "$OUT/calibrate.log"
cluster=()
[ -s "$OUT/device_cpu.toml" ] && cluster=(--cluster "$OUT/device_cpu.toml")
timeout 180 python3 benchmarks/seqpar.py --steps 4 --batch 16 "${cluster[@]}" --out "$OUT/seqpar_device.json" 2>&1 | tee "$OUT/seqpar.log"
