"""Options of the benchmark scripts that choose what runs (their timings live in committed reports)."""
from benchmarks.bench_branch import configs


def test_bench_branch_configs_follow_residual_and_depths():
    assert configs([0.75, 0.5], "both", [2, 3]) == [(0.75, False, 2), (0.75, True, 2), (0.5, False, 2),
                                                      (0.5, True, 2), (0.5, False, 3)]
    assert configs([0.5], "no", [2]) == [(0.5, False, 2)]
    assert configs([0.5], "yes", [2, 3, 4]) == [(0.5, True, 2), (0.5, False, 3), (0.5, False, 4)]
