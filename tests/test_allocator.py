"""sb.keep_freed_memory: large allocations come from the heap (no mmap per step), the CLI applies it unless told
not to, and results record it beside their speeds."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sigmab_plugin import allocator

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import ctypes, json, sys, torch
import sigmab_plugin as sb
from sigmab_plugin.baselines.provenance import machine

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
applied = sb.keep_freed_memory() if sys.argv[1] == "keep" else False
before = libc.mallinfo2().hblkhd
x = torch.empty(64 * 2 ** 20, dtype=torch.uint8)  # 64 MiB: above glibc's largest mmap threshold
print(json.dumps({"applied": applied, "mmapped": libc.mallinfo2().hblkhd - before,
                  "recorded": machine()["freed_memory_kept"]}))
"""


@pytest.mark.skipif(allocator._glibc() is None, reason="glibc only (mallopt, mallinfo2)")
@pytest.mark.parametrize("mode", ["keep", "default"])
def test_a_large_tensor_comes_from_the_heap_once_freed_memory_is_kept(mode):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, cwd=ROOT)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if mode == "keep":
        assert got == {"applied": True, "mmapped": 0, "recorded": True}
    else:  # glibc's default: a fresh mapping, handed back to the kernel when freed
        assert got["mmapped"] >= 64 * 2 ** 20 and got["recorded"] is False


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    monkeypatch.setattr(allocator, "_STATE", {"applied": False})
    assert allocator.keep_freed_memory() is False and allocator.freed_memory_kept() is False


@pytest.mark.parametrize("flag, expected", [([], 1), (["--no-keep-freed-memory"], 0), (["--keep-freed-memory"], 1)])
def test_compare_baselines_keeps_freed_memory_unless_told_not_to(monkeypatch, flag, expected):
    import importlib.util
    spec = importlib.util.spec_from_file_location("cb_alloc", ROOT / "examples" / "compare_baselines.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)

    def stop(cfg):
        raise ValueError("stopped before the run")
    monkeypatch.setattr(cli, "run_comparison", stop)
    with pytest.raises(SystemExit):
        cli.main(["--quiet", "--epochs", "0"] + flag)
    assert len(calls) == expected


def test_allocator_speed_benchmark_writes_both_allocators_for_every_case(tmp_path, monkeypatch):
    from benchmarks import allocator_speed
    monkeypatch.setattr(allocator_speed, "CASES", {"linear": ("torch.nn.Linear(3, 2)", 4, (3,), 2)})
    allocator_speed.main(["--steps", "4", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "allocator_speed.json").read_text())["rows"]
    assert [(r["case"], r["allocator"]) for r in rows] == [("linear", "default"), ("linear", "keep")]
    assert all(r["per_second"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
    assert "- linear: x" in (tmp_path / "allocator_speed.md").read_text()
    with pytest.raises(SystemExit):
        allocator_speed.main(["--steps", "3", "--out", str(tmp_path)])
