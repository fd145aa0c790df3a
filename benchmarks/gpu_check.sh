#!/usr/bin/env bash
# Every GPU check of the CUDA kernels in one command, on a machine with an NVIDIA GPU and CuPy, in the order that
# fails fastest (about 10 minutes in all on one GPU):
#   1. the device, torch and CuPy; every kernel's attributes, and every kernel launched at its largest tiles under
#      CUDA_LAUNCH_BLOCKING=1, so that a bad launch fails at its own line (benchmarks/kernel_smoke.py);
#   2. the kernel tests, also under CUDA_LAUNCH_BLOCKING=1: parity against float64 on CUDA and on the CPU emulator,
#      gradcheck, poisoned outputs, the side-stream test, the POET model on the kernels against the torch path;
#   3. compute-sanitizer racecheck, synccheck and memcheck on a small case, if compute-sanitizer is installed;
#   4. kernel against torch timings (bench_ops.py: d in {1024, 4096}, 8192 tokens, b in {64, 256, 512}, fp32 and
#      bf16, forward and forward + backward, host time per call), then a layer's training step (bench_layer.py);
#      both tables are appended to benchmarks/RESULTS.md.
# Needs no network: it runs from the source tree (PYTHONPATH=src) with the packages already installed
# (torch, transformers, peft, accelerate, cupy-cuda13x, nvidia-cuda-nvrtc==13.0.*, pytest, tqdm).
#
#   bash benchmarks/gpu_check.sh            # or: PYTHON=/path/to/python bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$PYTHON" -c "import torch, cupy; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, '| cupy', cupy.__version__, '|', torch.cuda.get_device_name())"
CUDA_LAUNCH_BLOCKING=1 "$PYTHON" benchmarks/kernel_smoke.py
CUDA_LAUNCH_BLOCKING=1 "$PYTHON" -m pytest -q -x -s -rs tests/test_kernels.py
if command -v compute-sanitizer > /dev/null; then
    for tool in racecheck synccheck memcheck; do
        compute-sanitizer --tool "$tool" --error-exitcode 1 "$PYTHON" benchmarks/kernel_smoke.py --largest 32 --rows 8
    done
else
    echo "compute-sanitizer not found (it ships with the CUDA toolkit): racecheck, synccheck and memcheck skipped"
fi
"$PYTHON" benchmarks/bench_ops.py --record benchmarks/RESULTS.md
"$PYTHON" benchmarks/bench_layer.py --dims 1024 4096 --tokens 8192 --record benchmarks/RESULTS.md
