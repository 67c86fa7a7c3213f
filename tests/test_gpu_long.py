"""benchmarks.gpu_long's job list, --only filter and deadline (the pool logic, with stand-in commands)."""
import sys
import time
from types import SimpleNamespace

from benchmarks import gpu_long

ARGS = SimpleNamespace(data_root="D", weights="W", tiny=True, device="cpu", out="O")


def test_jobs_cover_the_plan_longest_first_and_only_filters():
    todo = gpu_long.jobs(["resnet20", "resnet56"], {"resnet20": 4, "resnet56": 2}, ARGS)
    names = [j["name"] for j in todo]
    assert len(names) == len(set(names)) == 2 * sum(len(m) for _, _, m in gpu_long.PLAN)
    assert [j["cost"] for j in todo] == sorted((j["cost"] for j in todo), reverse=True)
    assert names[0].startswith("resnet56") and names[0].endswith("_sigmab")
    r20 = next(j for j in todo if j["name"] == "resnet20_f0.40_s1_fpgm")
    assert r20["cmd"][r20["cmd"].index("--epochs") + 1] == "4" and "--train-limit" in r20["cmd"]
    picked = gpu_long.select(todo, ["resnet20_f0.40_s1", "f0.55"])
    assert sorted(j["name"] for j in picked) == sorted(
        [f"resnet20_f0.40_s1_{m}" for m in ("sigmab", "fpgm", "hrank")]
        + [f"{m}_f0.55_s0_{x}" for m in ("resnet20", "resnet56") for x in ("fpgm", "hrank")])
    assert gpu_long.select(todo, None) == todo


def test_pool_stops_runs_at_the_deadline_and_lists_what_never_started(tmp_path):
    quick = {"name": "quick", "cmd": [sys.executable, "-c", "pass"]}
    slow = [{"name": f"slow{i}", "cmd": [sys.executable, "-c", "import time; time.sleep(60)"]} for i in range(3)]
    t0 = time.time()
    status = gpu_long.run_pool([quick] + slow, 2, time.time() + 4, tmp_path)
    assert time.time() - t0 < 40
    by = {s["name"]: s["rc"] for s in status}
    assert by["quick"] == 0
    assert sorted(by[f"slow{i}"] for i in range(3)).count("stopped at the deadline") == 2
    assert "not started" in by.values()
    assert (tmp_path / "quick.log").is_file()
