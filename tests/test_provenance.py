"""The commit recorded next to every result says whether tracked files had changed since it."""
import shutil
import subprocess

import pytest

from sigmab_plugin.baselines import provenance


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_commit_reads_dirty_when_tracked_files_changed(tmp_path, monkeypatch):
    monkeypatch.delenv("SIGMAB_COMMIT", raising=False)
    monkeypatch.chdir(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run(git + ["add", "a.py"], check=True)
    subprocess.run(git + ["commit", "-qm", "c"], check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "notes.txt").write_text("untracked files do not count\n")
    assert provenance._commit() == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert provenance._commit() == head + "+dirty"
    monkeypatch.setenv("SIGMAB_COMMIT", "abc1234")  # a copy without .git names its commit itself
    assert provenance._commit() == "abc1234"
