"""Every kernel benchmark's CPU dry run (tiny shapes, the interpreter): each op's inputs, cost model and the
implementations that can run here go through benchmarks/kernels.py and print their table (the peer reports why it
cannot run without CUDA). The GPU run of the same script gives the real tables (benchmarks/NOTES.md)."""
import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"
_spec = importlib.util.spec_from_file_location("benchmark_kernels", PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("op", bench.OPS)
def test_kernel_benchmark_tiny_run(op, capsys):
    assert bench.main(["--op", op, "--tiny", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert f"== {op} on CPU (tiny dry run)" in out and "lctrain" in out
