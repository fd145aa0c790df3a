"""Runs the package's CUDA kernels on the CPU, so that their indexing and arithmetic are tested without a GPU.

The shipped csrc/poet_ops.cu is compiled unchanged by g++ against cuda_emulation.h (one std::thread per CUDA
thread, a barrier for __syncthreads) into a shared library that exposes every kernel of KERNEL_NAMES by name.
Only the fp16 conversions differ: on a GPU they are single PTX instructions, here portable bit arithmetic.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path
from typing import Sequence

import torch

from poet_peft.ops.kernels import KERNEL_NAMES, THREADS, kernel_source

HEADER = Path(__file__).with_name("cuda_emulation.h")


def compiler() -> str | None:
    """The C++ compiler the emulator is built with, or None if there is none."""
    return shutil.which("g++")


def _entry_points() -> str:
    entries = "\n".join(
        f'{{"{name}", [](dim3 g, dim3 b, std::size_t s, void** w) {{ launch_from_words(&{name}, g, b, s, w); }}}},'
        for name in KERNEL_NAMES
    )
    return f"""
#include <map>
#include <string>
extern "C" int poet_emulate(const char* name, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int threads,
                            std::size_t shared, void** words) {{
    static const std::map<std::string, void (*)(dim3, dim3, std::size_t, void**)> kernels = {{
{entries}
    }};
    auto kernel = kernels.find(name);
    if (kernel == kernels.end()) return 1;
    kernel->second(dim3{{gx, gy, gz}}, dim3{{threads, 1, 1}}, shared, words);
    return 0;
}}
"""


class EmulatedLauncher:
    """Runs the kernels through the emulator library built in `directory`."""

    def __init__(self, directory: Path):
        source = directory / "poet_ops_emulated.cpp"
        source.write_text(f'#include "{HEADER}"\n' + kernel_source() + _entry_points())
        library = directory / "poet_ops_emulated.so"
        command = [compiler(), "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", str(source), "-o", str(library)]
        built = subprocess.run(command, capture_output=True, text=True)
        if built.returncode != 0:
            raise RuntimeError(f"the kernel emulator does not build:\n{built.stderr}")
        self.library = ctypes.CDLL(str(library))
        self.library.poet_emulate.restype = ctypes.c_int
        self.launches: list[str] = []

    def launch(self, name: str, grid: tuple[int, int, int], shared_memory: int, args: Sequence) -> None:
        """Run kernel `name` over `grid` on the CPU; args are tensors (by pointer) and ints, as for CuPy."""
        words = (ctypes.c_void_p * len(args))(*[a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args])
        status = self.library.poet_emulate(name.encode(), *grid, THREADS, shared_memory, words)
        if status != 0:
            raise KeyError(f"the emulator has no kernel {name}")
        self.launches.append(name)
