"""A real 2-trial NNI experiment end to end (tiny model and data): both trials succeed and report
intermediate and final metrics, no socket listens beyond loopback while it runs, and no process is
left behind. Also: the search space names only real config fields."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ROOT / "examples" / "nni" / "run_experiment.py"


def _listeners() -> set:
    """(address, port) of every listening TCP/UDP socket of this network namespace, IPv4 and IPv6."""
    out = subprocess.run(["ss", "-Hltun"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        local = line.split()[4]
        addr, _, port = local.rpartition(":")
        found.add((addr.strip("[]").split("%")[0], port))
    return found


def _loopback(addr: str) -> bool:
    return addr.startswith("127.") or addr == "::1"


def test_search_space_names_config_fields():
    sys.path.insert(0, str(LAUNCHER.parent))
    try:
        import trial
    finally:
        sys.path.pop(0)
    space = json.loads((LAUNCHER.parent / "search_space.json").read_text())
    branch, finetune = trial.split_params({k: None for k in space})
    assert set(branch) | set(finetune) == set(space) and branch and finetune


def test_two_trial_experiment_stays_on_loopback(tmp_path):
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode != 0:
        pytest.skip("no private network namespace here (unshare --net); the launcher refuses to run NNI")
    before = _listeners()
    seen, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            seen.update(_listeners())
            time.sleep(0.2)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        proc = subprocess.run([sys.executable, str(LAUNCHER), "--trials", "2", "--tuner", "Random", "--out",
                               str(tmp_path), "--", "--data", "digits", "--epochs", "1", "--pretrain-epochs", "1",
                               "--train-limit", "128", "--test-limit", "64", "--cache", str(tmp_path / "cache")],
                              capture_output=True, text=True, timeout=600)
    finally:
        stop.set()
        watcher.join()
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    exposed = {(a, p) for a, p in seen - before if not _loopback(a)}
    assert not exposed, f"listening beyond loopback while NNI ran: {exposed}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["succeeded"] and len(summary["trials"]) == 2
    for t in summary["trials"]:
        assert t["status"] == "SUCCEEDED" and len(t["intermediate"]) == 1
        final = t["final"][-1]
        assert 0 <= final["default"] <= 1 and 0 < final["active_fraction"] < 1
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.split()
    assert not left, f"processes left behind: {left}"
