"""examples/finetune_imagefolder.py: a branched timm model fine-tuned in a plain loop with timm's own
transforms, optimizer and scheduler, on a tiny ImageFolder written here."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sigmab_plugin as sb
from conftest import images, make_model, node_levels

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("finetune_imagefolder", ROOT / "examples" / "finetune_imagefolder.py")
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 24), ("val", 4)):
        for c, tint in (("cat", (200, 60, 60)), ("dog", (60, 60, 200))):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                img = np.clip(rng.normal(tint, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def test_imagefolder_example_trains_and_saves_a_tree(tmp_path):
    data = _folder(tmp_path / "data")
    out = example.main(["--data", str(data), "--model", "resnet18", "--img-size", "32", "--epochs", "2",
                        "--batch-size", "8", "--calib-size", "48", "--workers", "0", "--out", str(tmp_path / "run")])
    hist = out["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert all(h["distill"] > 0 and "balance" in h and sum(h["leaf_histogram"]) == 8 for h in hist)
    assert out["report"]["active_fraction_max"] < 0.8
    assert (tmp_path / "run" / "tree" / "sigmab_spec.json").is_file()
    assert json.loads((tmp_path / "run" / "history.json").read_text())[-1]["epoch"] == 2
    assert sb.is_branched(sb.load_branched(__import__("timm").create_model("resnet18", num_classes=2),
                                           tmp_path / "run" / "tree"))


def test_the_example_optimizer_trains_each_node_at_its_level_rate():
    model = sb.branch(make_model("cifar_resnet_b"), depth=2, calib_data=images(32), keep_ratio=0.5, progress=False)
    opt = example.make_optimizer(model, 0.02, 5e-4)
    levels, name = node_levels(model), {id(p): n for n, p in model.named_parameters()}
    seen = {}
    for g in opt.param_groups:
        for p in g["params"]:
            seen[(levels[name[id(p)]], p.ndim <= 1)] = (g["lr"], g["weight_decay"])
    assert seen == {(k, nd): (pytest.approx(0.02 * k), 0.0 if nd else pytest.approx(5e-4 / k))
                    for k in (1, 2, 4) for nd in (False, True)}
