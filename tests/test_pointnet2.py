"""PointNet++ (SSG and MSG): branched exactly (keep 1.0 is the dense model; a pruned node is the dense
model with the same channels masked, and that check catches coordinates-first grouping), cached and
on-the-fly grouping agree, FPGM and HRank prune it correctly, its checkpoints and data load."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
import torch_pruning as tp
from torch import nn

import sigmab_plugin as sb
from sigmab_plugin.adapters import pointnet2 as pn
from sigmab_plugin.baselines.points import PointDataset, load_points
from conftest import masked_dense


def clouds(n: int, points: int = 128, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, points, generator=g) * torch.tensor([1.0, 0.6, 0.3]).view(1, 3, 1)
    x = x + torch.randn(n, 3, 1, generator=g) * 0.5  # clouds differ in place and shape
    return x / x.norm(dim=1, keepdim=True).amax(-1, keepdim=True)


CALIB, X = clouds(48, seed=1), clouds(12, seed=2)


def model(variant: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = timm.create_model(f"pointnet2_{variant}", num_classes=10, width=0.125)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
    return m.eval()


def _close(a, b, tol=1e-5):
    assert float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max())), float((a - b).abs().max())


@pytest.mark.parametrize("variant", ["ssg", "msg"])
def test_keep_one_reproduces_the_dense_model(variant):
    dense = model(variant)
    tree = sb.branch(copy.deepcopy(dense), depth=2, keep_ratio=1.0, calib_data=CALIB, progress=False)
    assert sb.tree_state(tree).spec["split_points"] == ["sa1", "sa2"]  # found from feature_info
    with torch.no_grad():
        ref = dense(X)
        _close(tree(X), ref)
        sb.set_routing(tree, "soft")
        _close(tree(X), ref)


def _masked_gap(dense: nn.Module) -> float:
    tree = sb.branch(copy.deepcopy(dense), depth=2, keep_ratio=0.5, calib_data=CALIB, progress=False)
    assert sb.param_report(tree)["active_fraction_max"] < 0.6
    leaves = sb.route(tree, X)
    gap = 0.0
    with torch.no_grad():
        out = tree(X)
        for leaf in leaves.unique().tolist():
            rows = leaves == leaf
            gap = max(gap, float((out[rows] - masked_dense(dense, tree, leaf)(X)[rows]).abs().max()))
    return gap


@pytest.mark.parametrize("variant", ["ssg", "msg"])
def test_pruned_nodes_equal_the_masked_dense_model(variant):
    assert _masked_gap(model(variant)) <= 1e-4


def test_cached_and_on_the_fly_grouping_agree_and_eval_is_deterministic():
    cached, fresh = model("ssg"), model("ssg")
    fresh.cache = False
    pn.CACHE.store.clear()
    with torch.no_grad():
        a = cached(X)
        hits = pn.CACHE.hits
        b = cached(X)  # every cloud now comes from the cache
        assert pn.CACHE.hits == hits + len(X)
        c = fresh(X)
        d = cached(torch.cat([X[5:], X[:5]]))  # batch order does not change a cloud's result
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(d, torch.cat([a[5:], a[:5]]))
    tree = sb.branch(cached, depth=2, keep_ratio=0.5, calib_data=CALIB, progress=False)
    with torch.no_grad():
        _close(tree(X), tree(X))
        sb.set_routing(tree, "soft")
        fresh_tree = copy.deepcopy(tree)
        fresh_tree.cache = False
        _close(fresh_tree(X), tree(X))


def test_harness_teacher_reads_augmented_clouds_without_filling_the_cache():
    from sigmab_plugin.baselines.harness import make_teacher
    dense = model("ssg")
    teacher = make_teacher(dense)
    pn.CACHE.store.clear()
    with torch.no_grad():
        out = teacher(X)
    assert len(pn.CACHE.store) == 0 and teacher.cache is False and dense.cache is True
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        assert torch.equal(out, dense(X))  # the same outputs as the cached dense model
    assert len(pn.CACHE.store) == len(X)
    other = nn.Sequential(nn.Linear(3, 3), nn.Dropout())
    assert not make_teacher(other).training and other.training  # any model: a frozen eval-mode copy


def test_train_mode_samples_from_a_random_start():
    m = model("ssg").train()
    g1, g2 = m.grouping(X), m.grouping(X)
    assert not torch.equal(g1[0], g2[0])
    m.eval()
    assert all(torch.equal(a, b) for a, b in zip(m.grouping(X), m.grouping(X)))


def _static_gap(dense: nn.Module, method: str) -> float:
    """Largest output difference between ``dense`` pruned by Torch-Pruning and ``dense`` with the removed
    channels zeroed where they are made (each BatchNorm's output, so ReLU, pooling, gathering and
    concatenation carry the zeros to the right columns, whatever Torch-Pruning thinks the columns are)."""
    from sigmab_plugin.baselines.hrank import HRankImportance, feature_map_ranks

    pruned = copy.deepcopy(dense)
    imp = tp.importance.FPGMImportance(p=2) if method == "fpgm" else HRankImportance(feature_map_ranks(pruned, CALIB), pruned)
    with torch.enable_grad():
        pruner = tp.pruner.BasePruner(pruned, CALIB[:2], importance=imp, pruning_ratio=0.5,
                                      ignored_layers=[pruned.get_classifier()])
        names = {m: n for n, m in pruned.named_modules()}
        masks = {}
        for group in pruner.step(interactive=True):
            for item in group.items:
                if item.dep.pruning_fn == tp.prune_batchnorm_out_channels:
                    masks.setdefault(names[item.dep.target.module], set()).update(item.idxs)
            group.prune()
    ref = copy.deepcopy(dense)
    for name, idxs in masks.items():
        idx = torch.tensor(sorted(idxs))
        ref.get_submodule(name).register_forward_hook(lambda _m, _i, out, idx=idx: out.index_fill(1, idx, 0.0))
    assert sum(p.numel() for p in pruned.parameters()) < 0.5 * sum(p.numel() for p in dense.parameters())
    last_norms = {f"{lvl}.branches.{k}.{len(branch) - 2}"
                  for lvl in ("sa1", "sa2") for k, branch in enumerate(getattr(dense, lvl).branches)}
    assert last_norms <= set(masks)  # level outputs are pruned: the next level's input columns must follow
    with torch.no_grad():
        return float((pruned.eval()(X) - ref.eval()(X)).abs().max())


@pytest.mark.parametrize("variant", ["ssg", "msg"])
@pytest.mark.parametrize("method", ["fpgm", "hrank"])
def test_static_pruning_of_pointnet_is_a_masking(method, variant):
    assert _static_gap(model(variant), method) <= 1e-4


def test_public_checkpoint_layout_is_converted(tmp_path):
    ours = model("msg")
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    for name in ("sa1", "sa2", "sa3"):
        for k in range(len(getattr(ours, name).branches)):
            w = state[f"{name}.branches.{k}.0.weight"]
            state[f"{name}.branches.{k}.0.weight"] = torch.cat([w[:, -3:], w[:, :-3]], 1)  # coordinates first
    torch.save({"model_state_dict": state}, tmp_path / "public.pth")
    loaded = pn.load_public_checkpoint(model("msg", seed=5), tmp_path / "public.pth")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(X), ours(X))


def test_augmentation_is_seeded_and_bounded():
    ds = PointDataset("t", None, None, ["a"], (0.0,), (1.0,))
    x = clouds(6)
    a, b = ds.augment(x, torch.Generator().manual_seed(0)), ds.augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(a, ds.augment(x, torch.Generator().manual_seed(1)))
    assert float((a - x).abs().max()) < 3.0


def _write_h5(folder, n=4, points=64, label_key="label"):
    h5py = pytest.importorskip("h5py")
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        with h5py.File(folder / f"ply_data_{split}0.h5", "w") as h:
            h["data"] = np.random.default_rng(0).normal(size=(n, points, 3)).astype(np.float32)
            h[label_key] = np.arange(n, dtype=np.uint8).reshape(-1, 1)
    (folder / "shape_names.txt").write_text("\n".join(f"c{i}" for i in range(40)))


def _write_normal(folder, points=40, columns=6):
    folder.mkdir(parents=True)
    (folder / "modelnet40_shape_names.txt").write_text("chair\ntable\n")
    for split, shapes in (("train", ["chair_0001", "table_0001"]), ("test", ["chair_0002", "table_0002"])):
        (folder / f"modelnet40_{split}.txt").write_text("\n".join(shapes))
        for s in shapes:
            (folder / s.rpartition("_")[0]).mkdir(exist_ok=True)
            rows = np.random.default_rng(1).normal(size=(points, columns))
            (folder / s.rpartition("_")[0] / f"{s}.txt").write_text(
                "\n".join(",".join(f"{v:.4f}" for v in r) for r in rows))


def test_standard_layouts_load(tmp_path):
    _write_h5(tmp_path / "h5")
    ds = load_points("modelnet40-h5", str(tmp_path / "h5"), n_points=32)
    assert ds.train.images.shape == (4, 3, 32) and ds.classes[0] == "c0" and ds.train.labels.tolist() == [0, 1, 2, 3]
    assert torch.allclose(ds.train.images.float().norm(dim=1).amax(1), torch.ones(4), atol=1e-2)
    _write_normal(tmp_path / "txt")
    ds = load_points("modelnet40-normal", str(tmp_path / "txt"), n_points=32)
    assert ds.test.images.shape == (2, 3, 32) and ds.classes == ["chair", "table"] and ds.test.labels.tolist() == [0, 1]


@pytest.mark.parametrize("case,match", [
    ("h5_no_label", "no 'data'/'label'"), ("h5_missing", "no ply_data_train"), ("txt_two_columns", "expected x,y,z"),
    ("txt_few_points", "fewer than the 32"), ("txt_bad_number", "comma-separated"), ("npz_missing", "misses the arrays"),
])
def test_malformed_point_files_get_clear_errors(case, match, tmp_path):
    if case == "h5_no_label":
        _write_h5(tmp_path / "d", label_key="labels")
        name = "modelnet40-h5"
    elif case == "h5_missing":
        (tmp_path / "d").mkdir()
        name = "modelnet40-h5"
    elif case.startswith("txt"):
        _write_normal(tmp_path / "d", points=20 if case == "txt_few_points" else 40,
                      columns=2 if case == "txt_two_columns" else 6)
        if case == "txt_bad_number":
            f = tmp_path / "d" / "chair" / "chair_0001.txt"
            f.write_text(f.read_text().replace(",", ";", 3))
        name = "modelnet40-normal"
    else:
        (tmp_path / "d").mkdir()
        np.savez(tmp_path / "d" / "modelnet40-1024.npz", train_points=np.zeros((2, 32, 3)))
        name = "modelnet40"
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_points(name, str(tmp_path / "d"), n_points=32)


def test_reconstruct_brings_pointnet_paths_closer_to_dense():
    # sb.reconstruct on 1x1 convolutions over grouped points (features before coordinates) and the head
    dense = model("ssg")
    tree = sb.branch(copy.deepcopy(dense), depth=2, keep_ratio=0.5, calib_data=CALIB, progress=False).eval()

    def gap():
        with torch.no_grad():
            ref = dense(CALIB)
            return sum(float(((sb.forward_leaf(tree, CALIB, j) - ref) ** 2).mean()) for j in range(4))
    before = gap()
    report = sb.reconstruct(tree, dense, CALIB, min_samples=8)
    assert any(".sa2." in n or n.startswith("sa2.") for n in report["relative_error_after"])
    assert gap() < 0.8 * before
