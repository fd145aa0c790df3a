"""POET's CUDA kernels (csrc/poet_ops.cu) as torch custom ops with autograd, and the choice between them and torch.

The kernels are compiled at run time by CuPy's NVRTC, once per process and GPU architecture, and launched on
torch's current stream with tensors handed over through DLPack (no copies). `torch.ops.poet_peft.*` are
ordinary custom ops to autograd, `torch.compile` and distributed wrappers. CPU tensors, and CUDA tensors
without CuPy, use the torch reference in `blocks.py`; the environment variable POET_PEFT_KERNELS forces
either path ("cuda" or "torch"; default "auto").

Under "auto" the kernels are used only where they were measured faster: the first time a kind of work (an
operation, its device, dtype, block sizes and a power-of-two size bucket) comes, both paths are timed on it with
CUDA events (`prefer_kernels`) and the faster is kept for the rest of the process.
"""

from __future__ import annotations

import functools
import importlib.resources
import math
import os
import re
import statistics
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import torch

THREADS = 256  # POET_THREADS in the source
MAX_OUTPUTS = 16  # POET_MAX_OUTPUTS: outputs of a tile per thread
# Dynamic shared memory a block may use without opting in (48 KiB), less the 1 KiB sm_80+ reserve for the system.
SHARED_MEMORY = 47 * 1024
MAX_GRID_Y = 65_535  # CUDA's limit on gridDim.y, which counts rotation blocks: more are launched in chunks
GRAD_TILE, GRAD_CHUNK = 32, 32  # POET_GRAD_TILE, POET_GRAD_CHUNK
# The tensor-core kernels' output tile, staged reduction depth and padded staging strides (POET_MMA_*).
MMA_TILE, MMA_DEPTH, MMA_A_STRIDE, MMA_B_STRIDE = 64, 16, 20, 72
MAX_BLOCK = 512  # larger blocks (POET-FS) are dense GEMMs: cuBLAS through the torch path does them better
COMPILE_OPTIONS = ("-std=c++17",)
# What CuPy adds to COMPILE_OPTIONS when it compiles a RawModule: float subnormals flush to zero (the emulator models
# it). The compile test builds with both, as the GPU does.
CUPY_ADDED_OPTIONS = ("-ftz=true",)
KERNEL_MODES = ("auto", "cuda", "torch")
ENV_VARIABLE = "POET_PEFT_KERNELS"

_C_TYPES = {torch.float32: "float", torch.float64: "double", torch.float16: "poet_half", torch.bfloat16: "poet_bf16"}
KERNEL_NAMES = tuple(
    [
        f"{kernel}<{c_type}>"
        for kernel in ("cayley_neumann_forward", "cayley_neumann_backward")
        for c_type in ("float", "double")
    ]
    + [
        f"{kernel}<{c_type}>"
        for kernel in ("block_rotate", "block_rotate_grad_blocks")
        for c_type in ("float", "double")
    ]
    + [
        f"{kernel}<{c_type}>"
        for kernel in ("block_rotate_mma", "block_rotate_grad_blocks_mma")
        for c_type in ("float", "poet_bf16", "poet_half")
    ]
)
# Training never runs the float64 instantiations (rotations are float32 whatever the weights' dtype; float64 is for
# reference checks), and they take a quarter of the build: they are a second module, compiled on first use.
FLOAT64_KERNELS = tuple(name for name in KERNEL_NAMES if name.endswith("<double>"))
TRAINING_KERNELS = tuple(name for name in KERNEL_NAMES if name not in FLOAT64_KERNELS)


def kernel_source() -> str:
    """The CUDA source of all kernels (the repository's csrc/, shipped inside the package as poet_peft.csrc)."""
    return importlib.resources.files("poet_peft.csrc").joinpath("poet_ops.cu").read_text(encoding="utf-8")


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in, and keep rotations in, for data of `dtype`: float64 or float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Launcher(Protocol):
    """Something that runs a kernel of KERNEL_NAMES: CuPy on a GPU (tests add a CPU emulator)."""

    def launch(self, name: str, grid: tuple[int, int, int], shared_memory: int, args: Sequence) -> None: ...


class CupyLauncher:
    """Launches the kernels with CuPy on torch's current CUDA stream."""

    def launch(self, name: str, grid: tuple[int, int, int], shared_memory: int, args: Sequence) -> None:
        """Run kernel `name` on a grid of THREADS-thread blocks; args are tensors (by pointer) and ints."""
        import cupy
        import numpy

        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        with cupy.cuda.Device(device.index), _cupy_stream(torch.cuda.current_stream(device)):
            kernel = _kernel_function(torch.cuda.get_device_capability(device), name)
            # DLPack refuses tensors that require grad (we are below autograd here, so detach is safe), and CuPy
            # has no bfloat16: 16-bit data travels as int16 words, which the kernels reinterpret.
            arguments = tuple(
                cupy.from_dlpack(a.detach().view(torch.int16) if a.element_size() == 2 else a.detach())
                if isinstance(a, torch.Tensor)
                else numpy.int64(a)
                for a in args
            )
            kernel(grid, (THREADS, 1, 1), arguments, shared_mem=shared_memory)


@functools.lru_cache(maxsize=64)
def _cupy_stream(stream: torch.cuda.Stream):
    # CuPy's view of a torch stream, made once per stream (torch pools its streams and never frees them), through
    # the CUDA stream protocol that replaces the deprecated cupy.cuda.ExternalStream.
    import cupy

    return cupy.cuda.Stream.from_external(stream)


@functools.lru_cache(maxsize=None)
def _compiled_module(capability: tuple[int, int], names: tuple[str, ...]):
    # One module per GPU architecture and kernel set in this process; CuPy also caches binaries on disk.
    import cupy

    return cupy.RawModule(code=kernel_source(), options=COMPILE_OPTIONS, name_expressions=names)


@functools.lru_cache(maxsize=None)
def _kernel_function(capability: tuple[int, int], name: str):
    # Looked up once per kernel: CuPy's get_function builds a new function object on every call.
    names = FLOAT64_KERNELS if name in FLOAT64_KERNELS else TRAINING_KERNELS
    return _compiled_module(capability, names).get_function(name)


@functools.lru_cache(maxsize=None)
def _kernel_build_error(capability: tuple[int, int]) -> Optional[str]:
    """Why the kernels cannot be built for this GPU architecture (no NVRTC, no CUDA headers, an old driver), or None.

    Builds the kernels training uses; the float64 ones are built when a float64 tensor first needs them."""
    try:
        for name in TRAINING_KERNELS:
            _kernel_function(capability, name)
    except Exception as error:  # CuPy raises its own CompileException, CUDARuntimeError, OSError, ImportError …
        return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    return None


@functools.lru_cache(maxsize=None)
def _cupy_import_error() -> Optional[str]:
    try:
        import cupy  # noqa: F401
    except Exception as error:  # CuPy missing, or present without a usable CUDA runtime
        return f"{type(error).__name__}: {error}"
    return None


def _launcher_for(device: torch.device) -> tuple[Optional[Launcher], str]:
    """The launcher for tensors on `device`, or None and why there is none."""
    if device.type != "cuda":
        return None, f"the tensors are on {device.type}, and the kernels run on CUDA devices only"
    error = _cupy_import_error()
    if error is not None:
        return None, f"CuPy is not usable ({error}); install poet-peft[cuda]"
    # Compiled (once, all kernels) before the first launch, so that "auto" falls back to torch where they cannot be.
    error = _kernel_build_error(torch.cuda.get_device_capability(device))
    if error is not None:
        return None, f"the kernels do not build for this GPU ({error})"
    return CupyLauncher(), ""


def kernel_mode() -> str:
    """The path chosen by POET_PEFT_KERNELS: 'auto' (kernels where they can run), 'cuda' or 'torch'."""
    mode = os.environ.get(ENV_VARIABLE, "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"{ENV_VARIABLE}={mode!r} is not a valid choice; use one of {', '.join(KERNEL_MODES)}.")
    return mode


def use_kernels(tensor: torch.Tensor, block_sizes: Sequence[int]) -> bool:
    """Whether work on `tensor` with rotation blocks of `block_sizes` goes to the kernels (else to torch)."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    launcher, reason = _launcher_for(tensor.device)
    if launcher is not None:
        if tensor.dtype not in _C_TYPES:
            reason = f"dtype {tensor.dtype} is not one of {', '.join(map(str, _C_TYPES))}"
        elif max(block_sizes) > MAX_BLOCK:
            reason = f"a block of {max(block_sizes)} exceeds the kernels' limit of {MAX_BLOCK}"
        else:
            return True
    if mode == "cuda":
        raise RuntimeError(f"{ENV_VARIABLE}=cuda, but the kernels cannot run: {reason}. Set it to 'auto' or 'torch'.")
    return False


def _cuda_event_seconds(run: Callable[[], object], repeats: int = 5) -> float:
    """The median seconds of `run` on the current CUDA stream, after two warm-up calls."""
    for _ in range(2):
        run()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


TIMER: Callable[[Callable[[], object]], float] = _cuda_event_seconds  # the tests inject their own
_MEASURED: dict[tuple, bool] = {}  # kind of work → whether the kernels were the faster path, in this process


def prefer_kernels(
    tensor: torch.Tensor,
    block_sizes: Sequence[int],
    work: str,
    on_kernels: Callable[[], object],
    on_torch: Callable[[], object],
) -> bool:
    """Whether `work` on `tensor` goes to the kernels: never where they cannot run (`use_kernels`), always under
    POET_PEFT_KERNELS=cuda, and under "auto" where timing both callables once, for this kind of work, found the
    kernels faster. While torch.compile traces or a CUDA graph captures, an unmeasured kind goes to torch."""
    if not use_kernels(tensor, block_sizes):
        return False
    if kernel_mode() == "cuda":
        return True
    key = (tensor.device, tensor.dtype, work, tuple(block_sizes), 1 << max(0, tensor.numel() - 1).bit_length())
    if key not in _MEASURED:
        if torch.compiler.is_compiling() or (tensor.is_cuda and torch.cuda.is_current_stream_capturing()):
            return False
        with torch.no_grad():
            _MEASURED[key] = TIMER(on_kernels) < TIMER(on_torch)
    return _MEASURED[key]


def _launch(device: torch.device, name: str, grid: tuple[int, int, int], shared_memory: int, args: Sequence) -> None:
    launcher, reason = _launcher_for(device)
    if launcher is None:
        raise RuntimeError(f"Cannot run kernel {name}: {reason}.")
    launcher.launch(name, grid, shared_memory, args)


def _new_output(
    like: torch.Tensor, shape: Optional[Sequence[int]] = None, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """Uninitialised storage for a kernel's output (the kernels write every element): like `like`, or of `shape`."""
    if shape is None:  # same strides as `like`, so that a transposed weight's rotation is written coalesced
        return torch.empty_like(like, dtype=dtype)
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device)


def _tile(size: int, buffers: int, element_bytes: int, max_columns: int) -> tuple[int, int]:
    """(columns, depth) of a tile: `buffers` size×columns tiles and a size×depth slab fit in shared memory."""
    columns, depth = max(1, min(max_columns, THREADS * MAX_OUTPUTS // size)), 16
    while size * (buffers * columns + depth) * element_bytes > SHARED_MEMORY:
        if columns == 1 and depth == 1:
            raise ValueError(
                f"a block of {size} needs {size * (buffers + 1) * element_bytes} bytes of shared memory in the "
                f"smallest tile, more than the {SHARED_MEMORY} a kernel may use: use blocks of at most {MAX_BLOCK}"
            )
        if depth > 4 or columns == 1:
            depth //= 2
        else:
            columns //= 2
    return columns, depth


@dataclass(frozen=True)
class KernelResources:
    """What ptxas reports for one compiled kernel."""

    name: str
    registers: int
    spill_stores: int
    spill_loads: int


def compile_kernels(arch: str) -> list[KernelResources]:
    """Compile every kernel for `arch` (e.g. "sm_90") with NVRTC, which needs no GPU; raises on any compile error."""
    from cupy_backends.cuda.libs import nvrtc

    program = nvrtc.createProgram(kernel_source(), "poet_ops.cu", [], [])
    try:
        for name in KERNEL_NAMES:
            nvrtc.addNameExpression(program, name)
        try:
            options = [f"--gpu-architecture={arch}", "-Xptxas=-v", *COMPILE_OPTIONS, *CUPY_ADDED_OPTIONS]
            nvrtc.compileProgram(program, options)
        except nvrtc.NVRTCError as error:
            raise RuntimeError(f"poet_ops.cu does not compile for {arch}:\n{nvrtc.getProgramLog(program)}") from error
        log = nvrtc.getProgramLog(program)
        names = {nvrtc.getLoweredName(program, name): name for name in KERNEL_NAMES}
    finally:
        nvrtc.destroyProgram(program)
    resources = []
    for entry in re.split(r"Compiling entry function ", log)[1:]:
        mangled = re.match(r"'(\w+)'", entry).group(1)
        stores, loads = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", entry).groups()
        registers = re.search(r"Used (\d+) registers", entry).group(1)
        resources.append(KernelResources(names[mangled], int(registers), int(stores), int(loads)))
    return resources


def _chunks(count: int) -> list[tuple[int, int]]:
    """(first, count) of consecutive runs of at most MAX_GRID_Y rotation blocks: one launch each."""
    return [(first, min(MAX_GRID_Y, count - first)) for first in range(0, count, MAX_GRID_Y)]


# -- Cayley–Neumann ------------------------------------------------------------------------------------------
def _check_packed(packed: torch.Tensor, size: int) -> None:
    if packed.dim() != 2 or packed.shape[1] != size * (size - 1) // 2:
        raise ValueError(
            f"packed skew parameters must have shape (blocks, {size * (size - 1) // 2}), got {tuple(packed.shape)}"
        )
    if packed.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"packed skew parameters must be float32 or float64, got {packed.dtype}")


@torch.library.custom_op("poet_peft::cayley_neumann", mutates_args=())
def cayley_neumann(packed: torch.Tensor, size: int, terms: int) -> torch.Tensor:
    """Rotation blocks (I + Q)(I + Q + … + Q^terms), shape (blocks, size, size), from packed skew parameters."""
    _check_packed(packed, size)
    packed = packed.contiguous()
    rotations = _new_output(packed, (packed.shape[0], size, size))
    columns, depth = _tile(size, 1, packed.element_size(), size)
    shared = size * (columns + depth) * packed.element_size()
    name = f"cayley_neumann_forward<{_C_TYPES[packed.dtype]}>"
    for first, count in _chunks(packed.shape[0]):
        blocks = slice(first, first + count)
        grid = (math.ceil(size / columns), count, 1)
        _launch(packed.device, name, grid, shared, [packed[blocks], rotations[blocks], size, terms, columns, depth])
    return rotations


@cayley_neumann.register_fake
def _(packed: torch.Tensor, size: int, terms: int) -> torch.Tensor:
    return packed.new_empty(packed.shape[0], size, size)


@torch.library.custom_op("poet_peft::cayley_neumann_backward", mutates_args=())
def cayley_neumann_backward(packed: torch.Tensor, grad_rotations: torch.Tensor, size: int, terms: int) -> torch.Tensor:
    """Gradient of the packed skew parameters given the gradient of `cayley_neumann`'s rotation blocks."""
    packed, grad_rotations = packed.contiguous(), grad_rotations.to(packed.dtype).contiguous()
    grad_packed = torch.zeros_like(packed)  # zeroed: the kernel adds the two halves of each entry atomically
    columns, depth = _tile(size, 2, packed.element_size(), size)
    shared = size * (2 * columns + depth) * packed.element_size()
    name = f"cayley_neumann_backward<{_C_TYPES[packed.dtype]}>"
    for first, count in _chunks(packed.shape[0]):
        blocks = slice(first, first + count)
        grid = (math.ceil(size / columns), count, 1)
        args = [packed[blocks], grad_rotations[blocks], grad_packed[blocks], size, terms, columns, depth]
        _launch(packed.device, name, grid, shared, args)
    return grad_packed


@cayley_neumann_backward.register_fake
def _(packed: torch.Tensor, grad_rotations: torch.Tensor, size: int, terms: int) -> torch.Tensor:
    return torch.empty_like(packed)


def _cayley_neumann_setup(ctx, inputs, output) -> None:
    packed, ctx.size, ctx.terms = inputs
    ctx.save_for_backward(packed)


def _cayley_neumann_grad(ctx, grad_rotations: torch.Tensor):
    (packed,) = ctx.saved_tensors
    return cayley_neumann_backward(packed, grad_rotations, ctx.size, ctx.terms), None, None


cayley_neumann.register_autograd(_cayley_neumann_grad, setup_context=_cayley_neumann_setup)


# -- permuted block-diagonal rotation --------------------------------------------------------------------------
def _block_shapes(blocks: Sequence[torch.Tensor]) -> tuple[list[int], list[int]]:
    """(counts, sizes) of the groups of (count, size, size) blocks."""
    return [group.shape[0] for group in blocks], [group.shape[-1] for group in blocks]


def _groups(counts: Sequence[int], sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """(start, count, size) of each group of blocks along the permuted coordinates."""
    groups, start = [], 0
    for count, size in zip(counts, sizes):
        groups.append((start, count, size))
        start += count * size
    return groups


def _check_rotation_inputs(x: torch.Tensor, perm: torch.Tensor, blocks: Sequence[torch.Tensor], covered: int) -> None:
    # The kernels index through perm without bounds checks: a mismatch here would read out of bounds.
    if x.dim() != 2 or x.shape[1] != perm.numel():
        raise ValueError(
            f"x has {x.shape[-1]} coordinates per row but the permutation has {perm.numel()} (x must be 2-D)"
        )
    if perm.dtype != torch.int64:
        raise ValueError(f"the permutation must be int64, got {perm.dtype}")
    if covered > perm.numel():
        raise ValueError(f"the blocks cover {covered} coordinates, more than the {perm.numel()} of x")
    expected = accumulator_dtype(x.dtype)
    if any(group.dim() != 3 or group.shape[1] != group.shape[2] or group.dtype != expected for group in blocks):
        found = ", ".join(f"{tuple(g.shape)} {g.dtype}" for g in blocks)
        raise ValueError(f"blocks of a {x.dtype} x must be {expected}, shaped (count, size, size); got {found}")


def on_tensor_cores(dtype: torch.dtype) -> bool:
    """Whether rotations of `dtype` data run on tensor cores: always for bf16 and fp16, for fp32 as TF32 where torch's
    own fp32 matmuls may (`torch.set_float32_matmul_precision("high")`, i.e. `torch.backends.cuda.matmul.allow_tf32`),
    never for fp64."""
    return dtype in (torch.bfloat16, torch.float16) or (
        dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    )


def _mma_shared_memory(dtype: torch.dtype) -> int:
    """Bytes of the tensor-core kernels' staging: A (tile × depth) and B (depth × tile), padded, in words of dtype."""
    word = 4 if dtype == torch.float32 else 2
    return (MMA_TILE * MMA_A_STRIDE + MMA_DEPTH * MMA_B_STRIDE) * word


@torch.library.custom_op("poet_peft::block_rotate", mutates_args=())
def block_rotate(
    x: torch.Tensor, perm: torch.Tensor, blocks: list[torch.Tensor], transpose: bool, keep_uncovered: bool
) -> torch.Tensor:
    """Πᵀ·diag(B₁, …, I)·Π (or with every Bᵀ) applied to each row of the 2-D x; uncovered coordinates kept or zeroed.

    `blocks` holds one (count, size, size) tensor per group of equal blocks, in the accumulator dtype of x.
    """
    counts, sizes = _block_shapes(blocks)
    covered = sum(count * size for count, size in zip(counts, sizes))
    _check_rotation_inputs(x, perm, blocks, covered)
    rows, dim = x.shape
    perm = perm.contiguous()  # read by pointer
    y = _new_output(x)
    for group, (start, count, size) in zip(blocks, _groups(counts, sizes)):
        group = group.contiguous()
        for first, chunk in _chunks(count):
            args = [
                x,
                *x.stride(),
                rows,
                y,
                *y.stride(),
                perm,
                start + first * size,
                size,
                group[first : first + chunk],
            ]
            if on_tensor_cores(x.dtype):
                grid = (math.ceil(rows / MMA_TILE), chunk, math.ceil(size / MMA_TILE))
                name, shared = f"block_rotate_mma<{_C_TYPES[x.dtype]}>", _mma_shared_memory(x.dtype)
                _launch(x.device, name, grid, shared, [*args, int(transpose)])
            else:
                columns, depth = _tile(size, 1, group.element_size(), max(1, rows))
                shared = size * (columns + depth) * group.element_size()
                grid = (math.ceil(rows / columns), chunk, 1)
                name = f"block_rotate<{_C_TYPES[x.dtype]}>"
                _launch(x.device, name, grid, shared, [*args, int(transpose), columns, depth])
    if covered < dim:  # POET-FS: coordinates outside the subset pass through (or are zero, for M − I)
        rest = perm[covered:]
        y.index_copy_(1, rest, x.index_select(1, rest) if keep_uncovered else x.new_zeros(rows, dim - covered))
    return y


@block_rotate.register_fake
def _(x, perm, blocks, transpose, keep_uncovered):
    return torch.empty_like(x)


@torch.library.custom_op("poet_peft::block_rotate_grad_blocks", mutates_args=())
def block_rotate_grad_blocks(
    x: torch.Tensor, grad_y: torch.Tensor, perm: torch.Tensor, counts: list[int], sizes: list[int], transpose: bool
) -> list[torch.Tensor]:
    """Gradients of `block_rotate`'s blocks, one (count, size, size) tensor per group, summed over the rows."""
    rows = x.shape[0]
    # dL/dB[i][j] = Σₙ dy[n, π(i)]·x[n, π(j)] for y = B·x; for y = Bᵀ·x the roles of x and dy swap.
    a, b = (x, grad_y) if transpose else (grad_y, x)
    perm = perm.contiguous()  # read by pointer
    if on_tensor_cores(x.dtype):
        name, tile, shared = f"block_rotate_grad_blocks_mma<{_C_TYPES[x.dtype]}>", MMA_TILE, _mma_shared_memory(x.dtype)
    else:
        name, tile = f"block_rotate_grad_blocks<{_C_TYPES[x.dtype]}>", GRAD_TILE
        shared = 2 * GRAD_CHUNK * GRAD_TILE * accumulator_dtype(x.dtype).itemsize
    grads = []
    for start, count, size in _groups(counts, sizes):
        tiles = math.ceil(size / tile)
        # Split the rows so that the GPU has enough blocks (slices of at least 8 tiles' worth of rows); the partial
        # sums are added in a fixed order.
        splits = max(1, min(math.ceil(1024 / (tiles * tiles * count)), math.ceil(rows / (8 * GRAD_CHUNK))))
        chunk_grads = []
        for first, chunk in _chunks(count):
            partial = _new_output(x, (splits, chunk, size, size), accumulator_dtype(x.dtype))
            args = [a, *a.stride(), b, *b.stride(), rows, perm, start + first * size, size, partial]
            _launch(x.device, name, (tiles * tiles, chunk, splits), shared, args)
            chunk_grads.append(partial.sum(0))
        grads.append(torch.cat(chunk_grads) if len(chunk_grads) > 1 else chunk_grads[0])
    return grads


@block_rotate_grad_blocks.register_fake
def _(x, grad_y, perm, counts, sizes, transpose):
    return [x.new_empty(count, size, size, dtype=accumulator_dtype(x.dtype)) for count, size in zip(counts, sizes)]


def _block_rotate_setup(ctx, inputs, output) -> None:
    x, perm, blocks, ctx.transpose, ctx.keep_uncovered = inputs
    ctx.counts, ctx.sizes = _block_shapes(blocks)
    ctx.save_for_backward(x, perm, *blocks)


def _block_rotate_grad(ctx, grad_y: torch.Tensor):
    x, perm, *blocks = ctx.saved_tensors
    grad_y = grad_y.to(x.dtype)
    grad_x = grad_blocks = None
    if ctx.needs_input_grad[0]:  # y = M·x row by row, so dx = Mᵀ·dy; uncovered coordinates map as in the forward
        grad_x = block_rotate(grad_y, perm, blocks, not ctx.transpose, ctx.keep_uncovered)
    if ctx.needs_input_grad[2]:
        grad_blocks = block_rotate_grad_blocks(x, grad_y, perm, ctx.counts, ctx.sizes, ctx.transpose)
    return grad_x, None, grad_blocks, None, None


block_rotate.register_autograd(_block_rotate_grad, setup_context=_block_rotate_setup)
