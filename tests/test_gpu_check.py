"""`bench/gpu_check.py`: the GPU check's table, run with gloo on the CPU (``--cpu``): the same code
that checks NCCL and CUDA on a GPU, including its one-rank torchrun child."""

from __future__ import annotations

from bench import gpu_check


def test_the_cpu_dry_run_passes_every_row_of_the_table(capsys):
    assert gpu_check.main(["--cpu"]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = {line.split("  ")[0].strip(): line for line in table[2:]}
    assert list(rows) == [
        "gloo one-rank group",
        "kill and resume",
        "two-GPU rng checkpoint",
        "label maps, no host sync",
        "scaler + clip + accumulate",
        "trainer overhead",
    ]
    assert all(" PASS " in line for name, line in rows.items() if name != "trainer overhead")
    assert "gloo, DDP True" in rows["gloo one-rank group"] and "weights differ by 0.0e+00" in rows["kill and resume"]


def test_without_cuda_it_says_so_in_one_line_and_fails(capsys, mocker):
    mocker.patch("torch.cuda.is_available", return_value=False)
    assert gpu_check.main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "no CUDA GPU here" in err
