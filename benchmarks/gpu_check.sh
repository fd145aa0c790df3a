#!/usr/bin/env bash
# Every GPU check of the CUDA kernels in one command, on a machine with an NVIDIA GPU and CuPy:
#   1. the kernels compile for sm_80 and sm_90 (registers and spills printed);
#   2. parity against the torch reference and float64, gradcheck, poisoned outputs, random shapes (on CUDA
#      and on the CPU emulator), and the POET model on the kernels against the torch path;
#   3. benchmarks/bench_ops.py and bench_layer.py, whose tables are appended to benchmarks/RESULTS.md.
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
"$PYTHON" -m pytest -q -s -rs tests/test_kernels.py
"$PYTHON" benchmarks/bench_ops.py --record benchmarks/RESULTS.md
"$PYTHON" benchmarks/bench_layer.py --record benchmarks/RESULTS.md
