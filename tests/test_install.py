"""Packaging: ``pip install .`` adds exactly one top-level package, ``sigmab_plugin`` (the helper
folders install under it), and the CIFAR ResNets are timm models once it is imported."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import timm

import sigmab_plugin  # noqa: F401  (registers the adapters with timm)

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_has_one_top_level_package(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("sigmab_plugin", "adapters", "baselines"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, env=env, capture_output=True)
    wheel = next((tmp_path / "dist").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"sigmab_plugin"}, top
    for module in ("sigmab_plugin/adapters/cifar_resnet.py", "sigmab_plugin/baselines/harness.py"):
        assert module in names


def test_cifar_resnets_are_timm_models():
    model = timm.create_model("cifar_resnet20", num_classes=10)
    assert model.shortcut == "A" and model.get_classifier().out_features == 10
    assert timm.create_model("cifar_resnet56_b", num_classes=100).shortcut == "B"
    assert "cifar_resnet32" in timm.list_models("cifar_resnet*")
