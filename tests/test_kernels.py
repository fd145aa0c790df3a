"""The CUDA kernels: they compile for sm_80/sm_90, match float64 references, and back the POET layer.

Every parity test runs twice: on the CPU, through the emulator that compiles the shipped .cu source with g++
(tests/kernel_emulator.py), and on a GPU with CuPy when there is one. Kernel outputs start as NaN, so an
element a kernel never writes fails the test.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from kernel_emulator import EmulatedLauncher, compiler
from peft import get_peft_model

from poet_peft import POETConfig
from poet_peft.ops import kernels
from poet_peft.ops.blocks import BlockRotation, block_stochastic_layout, fully_stochastic_layout, rotate_weight
from poet_peft.ops.orthogonal import cayley_neumann, packed_size, skew_from_packed

# Blocks of b, a remainder block, a remainder of 1 (block b+1), and an FS subset; bigger ones on a real GPU.
LAYOUTS = {
    "cpu": [
        block_stochastic_layout(40, 8),
        block_stochastic_layout(37, 8),
        block_stochastic_layout(33, 8),
        fully_stochastic_layout(30, 0.25),
        block_stochastic_layout(48, 48),
    ],
    "cuda": [block_stochastic_layout(d, b) for d in (1024, 1000, 4097) for b in (8, 32, 64, 128, 256)]
    + [block_stochastic_layout(700, 512), fully_stochastic_layout(3000, 0.125)],
}
CAYLEY_SIZES = {"cpu": [2, 3, 8, 17, 33], "cuda": [8, 16, 32, 64, 100, 128, 256, 257, 512]}
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(scope="session")
def emulator(tmp_path_factory) -> EmulatedLauncher:
    if compiler() is None:
        pytest.skip("no g++: the CPU emulation of the CUDA kernels needs a C++20 compiler")
    return EmulatedLauncher(tmp_path_factory.mktemp("emulator"))


@pytest.fixture(params=["cpu", "cuda"], ids=["emulated", "cuda"])
def device(request, monkeypatch) -> torch.device:
    """Where the kernels run: the CPU emulator, or a GPU through CuPy (skipped without one)."""
    allocate = kernels._new_output

    def poisoned(*args, **kwargs):
        return allocate(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(kernels, "_new_output", poisoned)
    monkeypatch.setenv(kernels.ENV_VARIABLE, "cuda")  # the kernels or an error, never a silent torch fallback
    if request.param == "cuda":
        if not torch.cuda.is_available() or kernels._cupy_import_error() is not None:
            pytest.skip("needs an NVIDIA GPU and CuPy (pip install 'poet-peft[cuda]'): runs these tests on CUDA")
        return torch.device("cuda")
    launcher = request.getfixturevalue("emulator")
    monkeypatch.setattr(kernels, "_launcher_for", lambda device: (launcher, ""))
    return torch.device("cpu")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def reference_rotation(rotation: BlockRotation, x: torch.Tensor, transpose: bool, keep: bool) -> torch.Tensor:
    """The rotation of x in float64 by the torch path."""
    blocks = [b.double() for b in rotation.blocks]
    if not keep:
        blocks = [b - torch.eye(b.shape[-1], dtype=b.dtype, device=b.device) for b in blocks]
    reference = BlockRotation(rotation.layout, rotation.perm, blocks)
    return reference._apply(x.double(), blocks, transpose, keep)


def random_rotation(layout, device, scale=0.3, dtype=torch.float32, generator_seed=0) -> tuple:
    generator = torch.Generator().manual_seed(generator_seed)
    perm = torch.randperm(layout.dim, generator=generator).to(device)
    packed = (torch.randn(layout.num_parameters, generator=generator, dtype=torch.float64) * scale).to(device, dtype)
    return perm, packed


# -- compiling without a GPU -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_kernel_compiles(arch):
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
    except Exception as error:  # no CuPy, or no NVRTC library
        pytest.skip(f"no CUDA compiler: NVRTC is not usable ({error}); install 'poet-peft[cuda]'")
    resources = kernels.compile_kernels(arch)
    print(f"\n{arch}: kernel, registers, spill stores/loads (bytes)")
    for kernel in resources:
        print(f"  {kernel.name:40s} {kernel.registers:4d} {kernel.spill_stores:6d} {kernel.spill_loads:6d}")
    assert sorted(k.name for k in resources) == sorted(kernels.KERNEL_NAMES)
    # Two 256-thread blocks per SM need ≤ 128 registers; only the float64 test path may spill.
    assert all(k.registers <= 128 for k in resources)
    assert all(k.spill_stores == 0 for k in resources if "double" not in k.name)


# -- Cayley–Neumann ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("terms", [0, 1, 3, 5])
def test_cayley_neumann_matches_float64(device, terms):
    for size in CAYLEY_SIZES[device.type]:
        packed = torch.randn(3, packed_size(size), dtype=torch.float64) * (0.5 / size**0.5)
        expected = cayley_neumann(skew_from_packed(packed, size), terms)
        for dtype in (torch.float32, torch.float64):
            rotations = kernels.cayley_neumann(packed.to(device, dtype), size, terms)
            assert rotations.dtype == dtype and rotations.shape == (3, size, size)
            assert torch.isfinite(rotations).all()
            assert relative_error(rotations.cpu(), expected) <= TOLERANCE[dtype], (size, dtype)


@pytest.mark.parametrize("terms", [0, 3])
def test_cayley_neumann_gradient_matches_float64(device, terms):
    for size in CAYLEY_SIZES[device.type]:
        packed = torch.randn(2, packed_size(size), dtype=torch.float64) * (0.5 / size**0.5)
        grad_rotations = torch.randn(2, size, size, dtype=torch.float64)
        reference = packed.clone().requires_grad_(True)
        (cayley_neumann(skew_from_packed(reference, size), terms) * grad_rotations).sum().backward()
        on_device = packed.to(device, torch.float32).requires_grad_(True)
        (kernels.cayley_neumann(on_device, size, terms) * grad_rotations.to(device)).sum().backward()
        assert torch.isfinite(on_device.grad).all()
        assert relative_error(on_device.grad.cpu(), reference.grad) <= TOLERANCE[torch.float32], size


def test_cayley_neumann_gradcheck(device):
    packed = (torch.randn(2, packed_size(6), dtype=torch.float64) * 0.2).to(device).requires_grad_(True)
    check = lambda p: kernels.cayley_neumann(p, 6, 3)  # noqa: E731
    assert torch.autograd.gradcheck(check, (packed,), fast_mode=device.type == "cpu")


# -- permuted block rotation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_block_rotation_matches_float64(device, dtype):
    for index, layout in enumerate(LAYOUTS[device.type]):
        perm, packed = random_rotation(layout, device, dtype=kernels.accumulator_dtype(dtype), generator_seed=index)
        rotation = BlockRotation.from_packed(layout, perm, packed, neumann_terms=3)
        activations = torch.randn(3, 7, layout.dim, device=device).to(dtype)  # 21 rows: not a tile multiple
        transposed = torch.randn(layout.dim, 19, device=device).to(dtype).t()  # a weight's columns, strided
        for x in (activations, transposed):
            for transpose in (False, True):
                result = rotation.apply(x, transpose)
                assert result.dtype == dtype and result.shape == x.shape and torch.isfinite(result).all()
                expected = reference_rotation(rotation, x, transpose, keep=True)
                assert relative_error(result.cpu(), expected.cpu()) <= TOLERANCE[dtype], (layout, transpose)
            minus_identity = rotation.apply_minus_identity(x)
            expected = reference_rotation(rotation, x, transpose=False, keep=False)
            assert relative_error(minus_identity.cpu(), expected.cpu()) <= TOLERANCE[dtype], layout


@pytest.mark.parametrize("tf32", [False, True], ids=["fp32", "tf32"])
def test_block_rotation_gradients_match_float64(device, tf32, monkeypatch):
    # fp32 rotations run on CUDA cores, or as TF32 on tensor cores where torch lets its own fp32 matmuls (its flag
    # allow_tf32); TF32 keeps 10 mantissa bits of each operand, so its error is ~2⁻¹¹ relative.
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        check_rotation_gradients(device, tf32, monkeypatch)
    finally:
        torch.set_float32_matmul_precision(precision)


def check_rotation_gradients(device, tf32, monkeypatch):
    launched, launch = set(), kernels._launch

    def recorded(device, name, *rest):
        launched.add(name)
        launch(device, name, *rest)

    monkeypatch.setattr(kernels, "_launch", recorded)
    tolerance = 3e-3 if tf32 else TOLERANCE[torch.float32]
    for layout in LAYOUTS[device.type]:
        perm, packed = random_rotation(layout, device)
        x = torch.randn(21, layout.dim, device=device)
        grad_y = torch.randn(21, layout.dim, device=device)
        results = []
        for dtype in (torch.float32, torch.float64):
            leaf_packed = packed.to(dtype, copy=True).requires_grad_(True)
            leaf_x = x.to(dtype, copy=True).requires_grad_(True)
            rotation = BlockRotation.from_packed(layout, perm, leaf_packed, neumann_terms=3)
            both = rotation.apply(leaf_x) + rotation.apply(leaf_x, transpose=True)
            (both * grad_y.to(dtype)).sum().backward()
            results.append((leaf_packed.grad, leaf_x.grad))
        (packed_32, x_32), (packed_64, x_64) = results
        assert torch.isfinite(packed_32).all() and torch.isfinite(x_32).all()
        assert relative_error(packed_32.cpu(), packed_64.cpu()) <= tolerance, layout
        assert relative_error(x_32.cpu(), x_64.cpu()) <= tolerance, layout
    on_tensor_cores = {"block_rotate_mma<float>", "block_rotate_grad_blocks_mma<float>"}
    on_cuda_cores = {"block_rotate<float>", "block_rotate_grad_blocks<float>"}
    assert launched >= (on_tensor_cores if tf32 else on_cuda_cores)
    assert not launched & (on_cuda_cores if tf32 else on_tensor_cores)


def test_block_rotation_gradcheck(device):
    layout = block_stochastic_layout(11, 4)  # blocks of 4, 4 and 3
    perm, packed = random_rotation(layout, device, dtype=torch.float64)
    x = torch.randn(11, 11, dtype=torch.float64, device=device).requires_grad_(True)
    packed.requires_grad_(True)

    def rotate(packed, x):  # both sides of a weight: a strided (transposed) and a contiguous rotation
        rotation = BlockRotation.from_packed(layout, perm, packed, neumann_terms=3, dtype=torch.float64)
        return rotate_weight(x, left=rotation, right=rotation)

    # On the emulator, which starts a thread per CUDA thread, a random projection of the Jacobian will do.
    assert torch.autograd.gradcheck(rotate, (packed, x), fast_mode=device.type == "cpu")


def test_launches_split_rotation_blocks_over_the_grid_y_limit(device, monkeypatch):
    # b=2 on a 151,936-wide vocabulary layer is 75,968 blocks, above CUDA's 65,535 for gridDim.y: they go in
    # chunks. A limit of 2 makes 7 blocks take four launches; the results must equal one launch's.
    layout = block_stochastic_layout(28, 4)  # 7 blocks of 4
    perm, packed = random_rotation(layout, device)
    x, grad_y = torch.randn(9, 28, device=device), torch.randn(9, 28, device=device)
    packed_blocks = packed.view(7, -1)
    results = []
    for limit in (kernels.MAX_GRID_Y, 2):
        monkeypatch.setattr(kernels, "MAX_GRID_Y", limit)
        leaf = packed_blocks.clone().requires_grad_(True)
        rotations = kernels.cayley_neumann(leaf, 4, 3)
        leaf_x = x.clone().requires_grad_(True)
        y = kernels.block_rotate(leaf_x, perm, [rotations], False, True)
        (y * grad_y).sum().backward()
        results.append((rotations.detach(), y.detach(), leaf.grad, leaf_x.grad))
    for one_launch, chunked in zip(*results):
        assert torch.isfinite(chunked).all() and torch.allclose(one_launch, chunked, atol=1e-6)


def test_tiles_fit_shared_memory_and_impossible_blocks_are_refused():
    # Every block the kernels take fits a tile in 47 KiB (48 KiB less sm_80+'s 1 KiB reserve), in every kernel's
    # layout: one tile buffer (rotations, Cayley forward) or two (Cayley backward), float32 and float64.
    for size in (2, 3, 31, 32, 64, 127, 128, 256, 500, kernels.MAX_BLOCK):
        for buffers in (1, 2):
            for element_bytes in (4, 8):
                columns, depth = kernels._tile(size, buffers, element_bytes, 4096)
                assert columns >= 1 and depth >= 1
                assert size * (buffers * columns + depth) * element_bytes <= kernels.SHARED_MEMORY == 47 * 1024
    # Through the public op a block of 8192 used to loop forever; now it is refused at once.
    with pytest.raises(ValueError, match="a block of 8192 needs .* bytes of shared memory"):
        kernels._tile(8192, 1, 4, 4096)


def test_auto_falls_back_to_torch_when_the_kernels_do_not_build(monkeypatch):
    # No NVRTC, no CUDA headers or too old a driver: the build fails, and "auto" must use torch, not raise at the
    # first forward; "cuda" says why.
    def failing_build(capability, name):
        raise OSError("libnvrtc.so.13: cannot open shared object file")

    monkeypatch.setattr(kernels, "_kernel_function", failing_build)
    assert kernels._kernel_build_error.__wrapped__((9, 0)) == (
        "OSError: libnvrtc.so.13: cannot open shared object file"
    )
    monkeypatch.setattr(kernels, "_cupy_import_error", lambda: None)
    monkeypatch.setattr(kernels, "_kernel_build_error", lambda capability: "OSError: libnvrtc.so.13 missing")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    launcher, reason = kernels._launcher_for(torch.device("cuda", 0))
    assert launcher is None and reason == "the kernels do not build for this GPU (OSError: libnvrtc.so.13 missing)"


def test_the_kernels_flush_float32_subnormals_as_cupy_compiles_them(device):
    # CuPy builds with -ftz=true: a subnormal float32 input reads as zero on the GPU, and the emulator does the same,
    # so what the parity tests check is what the GPU computes. The torch path keeps subnormals.
    perm = torch.arange(16, device=device)
    blocks = [torch.eye(8, device=device).expand(2, 8, 8).contiguous()]
    x = torch.full((3, 16), 1e-40, device=device)
    x[:, ::2] = 0.5
    y = kernels.block_rotate(x, perm, blocks, False, True)
    assert torch.equal(y[:, ::2], x[:, ::2]) and torch.equal(y[:, 1::2], torch.zeros_like(y[:, 1::2]))
    assert (x[:, 1::2] > 0).all()


def test_training_builds_only_the_float32_and_16_bit_kernels(monkeypatch):
    # The float64 instantiations serve reference checks only: the build "auto" waits for leaves them out, and they
    # come from a module of their own the first time a float64 tensor needs one.
    requested, kernel_function = [], kernels._kernel_function
    monkeypatch.setattr(kernels, "_kernel_function", lambda capability, name: requested.append(name))
    assert kernels._kernel_build_error.__wrapped__((9, 0)) is None
    assert sorted(requested) == sorted(kernels.TRAINING_KERNELS) and not any("double" in name for name in requested)
    assert sorted(kernels.TRAINING_KERNELS + kernels.FLOAT64_KERNELS) == sorted(kernels.KERNEL_NAMES)
    modules = []

    class Module:
        def __init__(self, names):
            self.names = names

        def get_function(self, name):
            assert name in self.names
            return name

    monkeypatch.setattr(kernels, "_compiled_module", lambda capability, names: modules.append(names) or Module(names))
    kernel_function.__wrapped__((9, 0), "cayley_neumann_backward<double>")
    kernel_function.__wrapped__((9, 0), "block_rotate_mma<poet_bf16>")
    assert modules == [kernels.FLOAT64_KERNELS, kernels.TRAINING_KERNELS]


def test_each_torch_stream_is_wrapped_for_cupy_once_by_the_stream_protocol(monkeypatch):
    # Not the deprecated cupy.cuda.ExternalStream, and not once per launch.
    wrapped = []
    cupy = type(sys)("cupy")
    cupy.cuda = type(sys)("cupy.cuda")
    cupy.cuda.Stream = type("Stream", (), {"from_external": staticmethod(lambda stream: wrapped.append(stream))})
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    kernels._cupy_stream.cache_clear()
    stream = ("a torch stream", 7)  # hashable like torch.cuda.Stream, which hashes by its stream and device
    for _ in range(3):
        kernels._cupy_stream(stream)
    assert wrapped == [stream]
    kernels._cupy_stream.cache_clear()


def test_the_gpu_smoke_check_launches_every_kernel(device, monkeypatch):
    # benchmarks/kernel_smoke.py is what gpu_check.sh runs first (under CUDA_LAUNCH_BLOCKING=1 and
    # compute-sanitizer): it must reach every instantiation.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from kernel_smoke import exercise_every_kernel

    launched, launch = set(), kernels._launch
    monkeypatch.setattr(
        kernels, "_launch", lambda device, name, *rest: launched.add(name) or launch(device, name, *rest)
    )
    exercise_every_kernel(device, (8, 16), 4)
    assert launched == set(kernels.KERNEL_NAMES)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU: runs the kernels on a side stream")
def test_kernels_on_a_side_stream_match_the_default_stream(device):
    if device.type != "cuda":
        pytest.skip("the emulator has no streams: this test runs on CUDA only")
    layout = block_stochastic_layout(1024, 64)
    perm, packed = random_rotation(layout, device)
    x = torch.randn(4096, 1024, device=device)
    expected = BlockRotation.from_packed(layout, perm, packed, 3).apply(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the kernels must follow torch's current stream, not CuPy's default one
        actual = BlockRotation.from_packed(layout, perm, packed, 3).apply(x)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(actual, expected)


def test_block_rotate_rejects_mismatched_inputs(device):
    layout = block_stochastic_layout(12, 4)
    perm, packed = random_rotation(layout, device)
    blocks = [kernels.cayley_neumann(packed.view(3, 6), 4, 3)]
    with pytest.raises(ValueError, match="x has 5 coordinates per row but the permutation has 12"):
        kernels.block_rotate(torch.randn(3, 5, device=device), perm, blocks, False, True)
    with pytest.raises(ValueError, match="the blocks cover 24 coordinates, more than the 12"):
        kernels.block_rotate(torch.randn(3, 12, device=device), perm, blocks * 2, False, True)
    with pytest.raises(
        ValueError, match=r"blocks of a torch.bfloat16 x must be torch.float32, .*got \(3, 4, 4\) torch.float64"
    ):
        kernels.block_rotate(
            torch.randn(3, 12, device=device).bfloat16(), perm, [b.double() for b in blocks], False, True
        )


def test_custom_ops_pass_opcheck(device):
    layout = block_stochastic_layout(14, 4)  # three blocks of 4 and one of 2
    perm, packed = random_rotation(layout, device)
    blocks = [b.detach().requires_grad_(True) for b in BlockRotation.from_packed(layout, perm, packed, 3).blocks]
    x = torch.randn(6, 14, device=device, requires_grad=True)
    torch.library.opcheck(kernels.cayley_neumann, (packed[:18].view(3, 6).clone().requires_grad_(True), 4, 3))
    torch.library.opcheck(kernels.cayley_neumann_backward, (packed[:18].view(3, 6), torch.randn(3, 4, 4), 4, 3))
    for transpose in (False, True):
        torch.library.opcheck(kernels.block_rotate, (x, perm, blocks, transpose, True))
    grad_y = torch.randn_like(x)
    torch.library.opcheck(kernels.block_rotate_grad_blocks, (x.detach(), grad_y, perm, [3, 1], [4, 2], False))


def test_torch_compile_traces_the_custom_ops(device):
    layout = block_stochastic_layout(24, 8)
    perm, packed = random_rotation(layout, device)
    x = torch.randn(4, 24, device=device)

    def rotate(packed, x):
        return BlockRotation.from_packed(layout, perm, packed, neumann_terms=3).apply(x).square().sum()

    eager_packed, compiled_packed = packed.clone().requires_grad_(True), packed.clone().requires_grad_(True)
    rotate(eager_packed, x).backward()
    torch.compile(rotate, backend="aot_eager", fullgraph=True)(compiled_packed, x).backward()
    torch.testing.assert_close(compiled_packed.grad, eager_packed.grad)


# -- the POET layer on the kernels ---------------------------------------------------------------------------
@pytest.mark.parametrize("forward_path", ["weight", "input"])
def test_poet_model_on_kernels_matches_torch_path(device, monkeypatch, forward_path):
    tokens = torch.randint(0, 128, (2, 12), device=device)
    results = {}
    for mode in ("cuda", "torch"):
        monkeypatch.setenv(kernels.ENV_VARIABLE, mode)
        # Square and non-square layers, with and without a remainder block (96 = 12·8, 64 = 8·8; 100 in FFN).
        config = POETConfig(block=8, forward_path=forward_path, seed=3, target_modules=["q_proj", "down_proj"])
        model = get_peft_model(tiny_llama(ffn=100, layers=1).to(device), config)
        for parameter in (p for n, p in model.named_parameters() if "poet_" in n):
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
        logits = model(input_ids=tokens).logits
        logits.square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[mode] = logits.detach(), grads
    (logits, grads), (expected_logits, expected_grads) = results["cuda"], results["torch"]
    assert relative_error(logits.cpu(), expected_logits.cpu()) <= 1e-5
    assert grads.keys() == expected_grads.keys() and len(grads) > 0
    for name in grads:
        assert relative_error(grads[name].cpu(), expected_grads[name].cpu()) <= 1e-4, name


# -- choosing the path ---------------------------------------------------------------------------------------
def test_cpu_tensors_use_torch_unless_kernels_are_forced(monkeypatch):
    x = torch.randn(4, 8)
    monkeypatch.setenv(kernels.ENV_VARIABLE, "auto")
    assert not kernels.use_kernels(x, [8])
    monkeypatch.setenv(kernels.ENV_VARIABLE, "torch")
    assert not kernels.use_kernels(x, [8])
    monkeypatch.setenv(kernels.ENV_VARIABLE, "cuda")
    with pytest.raises(RuntimeError, match="POET_PEFT_KERNELS=cuda.*on cpu.*'auto' or 'torch'"):
        kernels.use_kernels(x, [8])
    monkeypatch.setenv(kernels.ENV_VARIABLE, "gpu")
    with pytest.raises(ValueError, match="'gpu' is not a valid choice; use one of auto, cuda, torch"):
        kernels.use_kernels(x, [8])


def test_unsupported_work_falls_back_to_torch_or_says_why(monkeypatch, emulator):
    monkeypatch.setattr(kernels, "_launcher_for", lambda device: (emulator, ""))
    monkeypatch.setenv(kernels.ENV_VARIABLE, "auto")
    assert kernels.use_kernels(torch.randn(2, 8), [8])
    assert not kernels.use_kernels(torch.randn(2, 8, dtype=torch.complex64), [8])
    assert not kernels.use_kernels(torch.randn(2, 8), [kernels.MAX_BLOCK + 1])
    monkeypatch.setenv(kernels.ENV_VARIABLE, "cuda")
    with pytest.raises(RuntimeError, match=f"a block of {kernels.MAX_BLOCK + 1} exceeds"):
        kernels.use_kernels(torch.randn(2, 8), [kernels.MAX_BLOCK + 1])


class CountingLauncher:
    """The emulator, counting launches."""

    def __init__(self, emulator):
        self.emulator, self.launches = emulator, 0

    def launch(self, *args):
        self.launches += 1
        self.emulator.launch(*args)


def test_auto_uses_the_kernels_only_where_they_were_measured_faster(monkeypatch, emulator):
    launcher = CountingLauncher(emulator)
    monkeypatch.setattr(kernels, "_launcher_for", lambda device: (launcher, ""))
    monkeypatch.setattr(kernels, "_MEASURED", {})
    monkeypatch.setenv(kernels.ENV_VARIABLE, "auto")
    layout = block_stochastic_layout(24, 8)
    perm, packed = random_rotation(layout, "cpu")
    timed = []

    def timer(seconds):  # an injected clock that runs the work once: the kernels take seconds[0], torch seconds[1]
        def measure(run):
            run()
            timed.append(run)
            return seconds[len(timed) % 2 == 0]

        return measure

    x = torch.randn(10, 24)
    monkeypatch.setenv(kernels.ENV_VARIABLE, "torch")
    expected = reference_rotation(BlockRotation.from_packed(layout, perm, packed, 3), x, transpose=False, keep=True)
    monkeypatch.setenv(kernels.ENV_VARIABLE, "auto")
    monkeypatch.setattr(kernels, "TIMER", timer((2.0, 1.0)))  # torch faster
    rotation = BlockRotation.from_packed(layout, perm, packed, neumann_terms=3)
    assert relative_error(rotation.apply(x), expected) <= 1e-5
    assert len(timed) == 4  # Cayley–Neumann and the rotation, each timed once on both paths
    launches = launcher.launches
    rotation.apply(x)
    assert len(timed) == 4 and launcher.launches == launches  # the choice is kept: torch, no launch
    monkeypatch.setattr(kernels, "_MEASURED", {})
    monkeypatch.setattr(kernels, "TIMER", timer((1.0, 2.0)))  # the kernels faster
    timed.clear()
    rotation = BlockRotation.from_packed(layout, perm, packed, neumann_terms=3)
    assert relative_error(rotation.apply(x), expected) <= 1e-5
    launches = launcher.launches
    assert relative_error(rotation.apply(x), expected) <= 1e-5 and launcher.launches == launches + 1
    rotation.apply(torch.randn(40, 24))  # a larger size bucket is measured afresh
    assert len(timed) == 6
    # Rotating in place is timed on a copy: the matrix is rotated once, not also by the timing runs.
    matrix = torch.randn(24, 6)
    before = matrix.clone()
    rotation.rotate_(matrix, dim=0)
    assert len(timed) == 8 and relative_error(matrix, rotation.rotate_columns(before)) <= 1e-5
    # Forced, the kernels run unmeasured.
    monkeypatch.setenv(kernels.ENV_VARIABLE, "cuda")
    count = len(timed)
    rotation.apply(torch.randn(200, 24))
    assert len(timed) == count


def test_wheel_ships_the_kernel_source(tmp_path):
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed here, so no wheel can be built without the network")
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(root)]
    subprocess.run([*command, "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("poet_peft-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("poet_peft/csrc/poet_ops.cu").decode("utf-8")
    assert shipped == kernels.kernel_source()
    for name in {name.split("<")[0] for name in kernels.KERNEL_NAMES}:
        assert f"__launch_bounds__(POET_THREADS, 2)\n{name}(" in shipped
