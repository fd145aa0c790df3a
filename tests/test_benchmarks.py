"""Benchmarks stay runnable: each one end to end at toy size, offline, checked against known parameter counts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(tmp_path: Path, script: str, *flags: str) -> str:
    """Run benchmarks/<script> offline with --record; the Markdown it appended (fails with its stderr if it fails)."""
    record = tmp_path / "RESULTS.md"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    command = [sys.executable, f"benchmarks/{script}", *flags, "--record", str(record)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return record.read_text()


def table_rows(text: str, columns: int) -> dict[str, list[str]]:
    """The rows of the Markdown tables in text that have `columns` cells, keyed by their first cell."""
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()]
    return {row[0]: row[1:] for row in cells if len(row) == columns}


def test_bench_ora_trains_times_and_records_each_variant(tmp_path):
    toy = ["--model_size", "nano", "--steps", "2", "--batch_size", "2", "--block_size", "32", "--eval_samples", "8"]
    timing = ["--timing_rounds", "1", "--timing_steps", "1"]
    variants = ["--variants", "vanilla", "ora", "synthesizer_factorized"]
    table = table_rows(run_benchmark(tmp_path, "bench_ora.py", *toy, *timing, *variants), 6)
    # nano: d=64, 2 layers, 2 heads. ORA freezes 2·64²·2 = 16,384 weights; the Synthesizer swaps Q/K (16,384) for
    # R1, R2 of 2 heads × 32 positions × 16 per layer (4,096).
    assert table["vanilla"][1:] == ["+0.0%", table["vanilla"][2], "1.000", "1,149,248 of 1,149,248"]
    assert table["ora"][4] == "1,132,864 of 1,149,248"
    assert table["synthesizer_factorized"][4] == "1,136,960 of 1,136,960"
    assert all(float(row[0]) > 1 and float(row[3]) > 0 for row in map(table.get, ["ora", "synthesizer_factorized"]))


def test_bench_e4_reports_time_to_x_final_perplexity_and_clamp_cost(tmp_path):
    toy = ["--steps", "4", "--warmup", "2", "--eval_every", "2", "--eval_sequences", "4", "--rank", "2"]
    shape = ["--batch_size", "2", "--block_size", "32", "--seeds", "0", "1", "--variants", "b0", "e4", "b3"]
    text = run_benchmark(tmp_path, "bench_e4.py", *toy, *shape)
    table = table_rows(text, 8)
    assert set(table) == {"variant", "---", "b0", "e4", "b3"}
    # X is b0's own mean perplexity at step 2 (70% of 4 steps, rounded to an evaluation): at least one b0 seed
    # reaches it there, and every final perplexity is a number.
    assert table["b0"][0] in ("1/2", "2/2") and table["b0"][4].split(" ± ")[0].replace(".", "").isdigit()
    assert all(float(row[4].split(" ± ")[0]) > 1 for row in map(table.get, ["b0", "e4", "b3"]))
    assert "Spectral clamp (b3):" in text and " ms per step" in text


def test_bench_monitor_measures_its_overhead_and_draws_both_runs(tmp_path):
    toy = ["--model_size", "nano", "--steps", "4", "--every", "2", "--topk", "2", "--eval_samples", "8"]
    table = table_rows(run_benchmark(tmp_path, "bench_monitor.py", *toy, "--plot_dir", str(tmp_path / "plots")), 8)
    assert [table[name][:2] for name in ("adamw", "poet")] == [["14", "2"], ["14", "2"]]  # steps 2 and 4, not 0
    assert all(0 < float(table[name][4].rstrip("%")) < 100 for name in ("adamw", "poet"))
    assert sorted(path.name for path in (tmp_path / "plots").iterdir()) == [
        "orthogonality.png", "principal_cosines.png", "sigma_max.png", "spectra.png", "spectrum_drift.png",
    ]  # fmt: skip


def test_bench_glue_runs_each_method_on_the_offline_demo(tmp_path):
    quick = ["--methods", "full,poet", "--max_train_steps", "2", "--max_eval_samples", "16"]
    table = table_rows(run_benchmark(tmp_path, "bench_glue.py", *quick), 7)
    # all-MiniLM-L6-v2: 22,713,216 weights + a 384×2 head; POET b=64 on its 36 linears: 1,306,368 Q + the head.
    assert table["full"][0] == "0.0002" and table["full"][4] == "22,713,986"
    assert table["poet"][0] == "0.00025 (Q: 0.00025)" and table["poet"][4] == "1,307,138"
    assert all(0 <= float(table[name][1]) <= 1 and float(table[name][5]) >= 0 for name in ("full", "poet"))


def test_bench_layer_times_every_method_and_states_the_flop_floor(tmp_path):
    toy = ["--dims", "128", "--tokens", "64", "256", "--blocks", "16", "--lora_rank", "8", "--repeats", "1"]
    text = run_benchmark(tmp_path, "bench_layer.py", *toy, "--memory_tokens", "256")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines() if line[:5] == "| 128"]
    assert [row[2] for row in rows[:8]] == [
        "dense + AdamW", "POET-BS b=16, weight", "POET-BS b=16, input", "POET-BS b=16, auto",
        "POET-BS b=16, weight, store", "POET-FS b=1/2, auto", "PEFT OFT b=16", "PEFT LoRA r=8",
    ]  # fmt: skip
    assert len(rows) == 16 and all(row[4] == "1.000" for row in rows if row[2] == "dense + AdamW")
    at_256 = {row[2]: row for row in rows if row[1] == "256"}
    # The floor at d=128, b=16, 256 tokens, against the dense 4·256·128² flops: weight-centric stored adds 10·b·d² for
    # the rotations, recomputed 12·b·d² (R·W0 again: x wants no gradient, so R·W0·P is not rebuilt); input-centric
    # recomputed 12·tokens·d·b (P's 2·tokens·d·b again, not R's) and the matmul's 2·tokens·d² again. Cayley–Neumann:
    # 2 sides × 8 matmuls (two builds of 2, the gradient's 4) × 2·16³ flops × 8 blocks; stored, 6 (one build).
    dense, cayley, stored_cayley = 4 * 256 * 128**2, 2 * 8 * 2 * 16**3 * 8, 2 * 6 * 2 * 16**3 * 8
    assert at_256["POET-BS b=16, weight"][5] == f"{(dense + 12 * 16 * 128**2 + cayley) / dense:.3f}"
    input_centric = dense + 12 * 256 * 128 * 16 + 2 * 256 * 128**2 + cayley
    assert at_256["POET-BS b=16, input"][5] == f"{input_centric / dense:.3f}"
    stored = at_256["POET-BS b=16, weight, store"][5]
    assert stored == f"{(dense + 10 * 16 * 128**2 + stored_cayley) / dense:.3f}"
    assert all(float(row[6]) > 0 for row in at_256.values())  # peak memory probed at 256 tokens only
    assert all(row[6] == "" for row in rows if row[1] == "64")


def test_bench_pretrain_widens_each_sweep_reseeds_ablates_and_resumes(tmp_path):
    results = tmp_path / "runs.jsonl"
    toy = ["--model_size", "nano", "--steps", "2", "--batch_size", "2", "--block_size", "32", "--eval_samples", "4"]
    plan = ["--lr_steps", "0", "--max_lr_points", "2", "--seeds", "2", "--ablations", "k=0", "--ablation_seeds", "1"]
    flags = [*toy, *plan, "--methods", "adamw", "poet-bs b=h/2", "--results", str(results)]
    text = run_benchmark(tmp_path, "bench_pretrain.py", *flags, "--plot", str(tmp_path / "loss.png"))
    table = table_rows(text, 8)
    # nano with a 1,024-token BPE: 2·1024·64 embedding and lm_head weights + 100,352 in 14 block linears + 320 norm
    # weights. POET-BS b=32 swaps the block weights for 496 Q entries per 32×32 block: 2 blocks on a side of 64; on
    # a side of 176, 5 and a remainder block of 16 (120 entries); so 2 × (4·4·496 + 3·(7·496 + 120)) = 37,424.
    assert table["adamw"][5] == "231,744" and table["poet-bs b=h/2"][5] == f"{231_744 - 100_352 + 37_424:,}"
    # Each sweep started at its centre (AdamW 4e-3, POET's Q 1e-3·256/32) and widened once, towards the better
    # side, to two lrs; then seed 1 at the best.
    assert table["adamw"][6].startswith("0.004: ") or table["adamw"][6].startswith("0.002: ")
    assert "0.008: " in table["poet-bs b=h/2"][6] and table["adamw"][2] == table["poet-bs b=h/2"][2] == "2"
    assert text.count("| Neumann terms k (Table 7) | k=0 |") == 1
    assert len(results.read_text().splitlines()) == 2 * 3 + 1
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    # A rerun reports from the results file and trains nothing.
    assert table_rows(run_benchmark(tmp_path, "bench_pretrain.py", *flags), 8) == table
    assert len(results.read_text().splitlines()) == 7


def test_bench_ops_times_each_shape_dtype_and_pass(tmp_path):
    flags = ["--blocks", "8", "--dims", "32", "--tokens", "16", "--dtypes", "float32", "bfloat16", "--repeats", "1"]
    text = run_benchmark(tmp_path, "bench_ops.py", *flags)
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()]
    rotations = [row for row in cells if len(row) == 9 and row[0] == "8"]
    assert [(row[2], row[3]) for row in rotations] == [
        (dtype, rotation_pass)
        for dtype in ("float32", "bfloat16")
        for rotation_pass in ("forward", "forward + backward")
    ]
    # Without a GPU the kernel columns say n/a and the torch ones are times.
    assert all(row[4] == "n/a" and float(row[5]) > 0 and float(row[6]) > 0 for row in rotations)
    assert "kernels n/a µs, torch " in text


def test_bench_memory_counts_what_a_step_keeps_and_resumes(tmp_path):
    methods = ["--methods", "adamw", "poet --block 256", "poet --block 256 --memory_mode store"]
    flags = ["--batches", "1x64", "--steps", "0", "--results", str(tmp_path / "runs.jsonl"), *methods]
    text = run_benchmark(tmp_path, "bench_memory.py", *flags)
    cells = ([cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines())
    rows = {row[3].strip("`"): row for row in cells if len(row) == 13 and row[0] == "60m"}
    adamw, recompute, store = rows["adamw"], rows["poet --block 256"], rows["poet --block 256 --memory_mode store"]
    # LLaMA-60M with vocab 2048: 26.2M fp32 parameters (100 MiB), all trained by AdamW (two moments each).
    assert adamw[4] == adamw[5] == "100" and adamw[6] == "200"
    assert recompute[7] == adamw[7] and int(store[7]) > int(adamw[7])  # saved tensors: AdamW's, or more
    assert float(recompute[9]) < min(1, float(store[9]))
    # What the allocator held at the peak of building and a step: below AdamW's too (the backward's temporaries
    # included), "MiB (× AdamW)".
    assert float(recompute[10].split("(")[1].rstrip(")")) < 1 and adamw[10].endswith("(1.00)")
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 3
    # A rerun prints the table again from the saved rows and measures nothing.
    assert run_benchmark(tmp_path, "bench_memory.py", *flags).count("| 60m |") == 6
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 3


def test_bench_memory_under_fsdp2_reports_each_ranks_half(tmp_path):
    flags = ["--batches", "1x64", "--steps", "0", "--ranks", "2", "--results", str(tmp_path / "runs.jsonl")]
    text = run_benchmark(tmp_path, "bench_memory.py", *flags, "--methods", "adamw", "poet --block 256")
    cells = ([cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines())
    rows = {row[3].strip("`"): row for row in cells if len(row) == 13 and row[0] == "60m, rank 0 of 2 (FSDP2)"}
    adamw, poet = rows["adamw"], rows["poet --block 256"]
    # Half of LLaMA-60M's 100 MiB of parameters, of their gradients and of AdamW's 200 MiB of moments per rank.
    assert adamw[4] == adamw[5] == "50" and adamw[6] == "100"
    assert float(poet[9]) < 1 and float(poet[10].split("(")[1].rstrip(")")) < 1
