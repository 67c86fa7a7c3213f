"""The class-grouped routing experiment of benchmarks/ablate_recipe.py: a balanced class->leaf
assignment, and a route loss that reaches training and is removed afterwards."""
import pytest
import torch

import sigmab_plugin as sb
import sigmab_plugin.finetune as ft
from benchmarks.ablate_recipe import class_leaves, route_loss

from conftest import images, make_model


def _tree():
    model = make_model("cifar_resnet_a").eval()
    return sb.branch(model, depth=2, calib_data=images(64, seed=1), keep_ratio=0.5, progress=False)


def test_class_leaves_is_a_balanced_assignment():
    tree = _tree()
    x = (images(120, seed=2) * 40 + 128).clamp(0, 255).to(torch.uint8)
    y = torch.arange(120) % 10
    leaf = class_leaves(tree, x, y, lambda t: t.float() / 255, 10)
    assert leaf.shape == (10,) and int(leaf.min()) >= 0 and int(leaf.max()) <= 3
    assert torch.bincount(leaf, minlength=4).max() <= 3  # ceil(10 classes / 4 leaves)


def test_route_loss_is_added_and_removed():
    tree = _tree().train()
    sb.set_routing(tree, "soft")
    x, y = images(8, seed=3), torch.arange(8) % 10
    leaf = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1])
    base = ft.training_loss
    with route_loss(2.0, leaf):
        assert ft.training_loss is not base
        out = tree(x)
        loss, parts = ft.training_loss(tree, out, y)
    assert ft.training_loss is base
    plain, _ = base(tree, out, y)
    probs = sb.tree_state(tree).last_leaf_probs
    expected = -probs.log().gather(1, leaf[y][:, None]).mean()
    torch.testing.assert_close(loss, plain + 2.0 * expected)
    assert parts["route"] > 0


def test_capped_argmin_gives_the_best_leaf_within_capacity():
    from benchmarks.ablate_recipe import capped_argmin
    loss = torch.tensor([[0.1, 0.9, 0.8], [0.2, 0.3, 0.9], [0.1, 2.0, 0.5], [0.9, 0.8, 0.1]])
    assert capped_argmin(loss, 4).tolist() == [0, 0, 0, 2]  # no cap binds: the plain argmin
    # cap 2 on column 0: rows 2 (gap 0.4) and 0 (gap 0.7) prefer it most; row 1 (gap 0.1) goes to its next best
    assert capped_argmin(loss, 2).tolist() == [0, 1, 0, 2]
    counts = torch.bincount(capped_argmin(torch.rand(64, 4, generator=torch.Generator().manual_seed(0)), 16), minlength=4)
    assert counts.tolist() == [16, 16, 16, 16]
    with pytest.raises(ValueError, match="cannot hold 5 rows"):
        capped_argmin(torch.rand(5, 2), 2)
    with pytest.raises(ValueError, match="fewer than 2 columns"):
        capped_argmin(torch.rand(3, 1), 3)


def test_loss_route_loss_targets_the_capped_lowest_loss_leaf():
    from benchmarks.ablate_recipe import capped_argmin, loss_route_loss
    import torch.nn.functional as F
    tree = _tree().train()
    sb.set_routing(tree, "soft")
    x, y = images(8, seed=3), torch.arange(8) % 10
    base = ft.training_loss
    with loss_route_loss(1.5):
        out = tree(x)
        loss, parts = ft.training_loss(tree, out, y)
    assert ft.training_loss is base
    plain, _ = base(tree, out, y)
    state = sb.tree_state(tree)
    paths, probs = state.last_paths, state.last_leaf_probs
    per = torch.full((8, 4), float("inf"))
    per[paths.sample, paths.leaf] = F.cross_entropy(paths.output, y[paths.sample], reduction="none").detach()
    goal = capped_argmin(per, 2)
    torch.testing.assert_close(loss, plain + 1.5 * -probs.clamp_min(1e-8).log().gather(1, goal[:, None]).mean())
    assert parts["route"] > 0 and torch.bincount(goal, minlength=4).max() <= 2


def test_ablation_report_shows_the_last_epochs_leaf_entropy_and_route_loss(tmp_path, monkeypatch):
    import benchmarks.ablate_recipe as ar
    row = {"method": "sigmab", "distilled": True, "active_fraction": 0.39, "top1_before_finetune": 0.2, "top1": 0.78,
           "best_leaf_top1": 0.77, "oracle_top1": 0.88, "conditional_gain": 0.01, "leaf_histogram": [1, 1, 1, 1],
           "train_images_per_second": 200.0, "history": [{"leaf_entropy": 1.3, "route": 1.5},
                                                          {"leaf_entropy": 1.15, "route": 1.58}]}
    plain = {**row, "history": [{"leaf_entropy": 0.48}]}
    done = {"args": {"model": "m", "data": "d", "target_fraction": 0.4, "epochs": 3, "train_limit": 1, "val_size": 1},
            "machine": {"commit": "c", "cpu": "x", "threads": 2, "date": "t"}, "rows": {"lr": row, "plain": plain}}
    ar.report(done, str(tmp_path / "r.md"))
    text = (tmp_path / "r.md").read_text()
    assert "| 200 | 1.15 / 1.58 |" in text and "| 200 | 0.48 |" in text
    assert "Rows by the commit" not in text  # one commit: the header's
    done["rows"]["later"] = {**plain, "commit": "c2"}  # a row a later run added at another commit
    ar.report(done, str(tmp_path / "r.md"))
    assert "Rows by the commit they ran at: c: lr, plain; c2: later." in (tmp_path / "r.md").read_text()
    # two routing targets at once would silently train only one: refused
    monkeypatch.setitem(ar.VARIANTS, "both", ("sigmab", {}, dict(route_weight=1.0, loss_route_weight=1.0), True))
    monkeypatch.setattr(ar, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded data")))
    with pytest.raises(ValueError, match=r"\['both'\] set route_weight and loss_route_weight"):
        ar.main(["--variants", "both", "--out", str(tmp_path / "out")])


def test_track_scores_every_epoch_and_the_report_plots_it(tmp_path):
    import json
    import benchmarks.ablate_recipe as ar
    common = ["--data", "digits", "--checkpoint", "", "--train-limit", "128", "--val-size", "64", "--epochs", "2",
              "--batch-size", "64", "--variants", "bal2_nocover", "fpgm_kd"]
    ar.main(common + ["--track", "--out", str(tmp_path / "tracked")])
    rows = json.loads((tmp_path / "tracked" / "results.json").read_text())["rows"]
    tree, static = rows["bal2_nocover"]["history"], rows["fpgm_kd"]["history"]
    assert len(tree) == len(static) == 2
    assert all("test_conditional_gain" in h and "test_best_leaf_top1" in h for h in tree)
    assert all("test_top1" in h and "test_conditional_gain" not in h for h in static)
    assert tree[-1]["test_top1"] == pytest.approx(rows["bal2_nocover"]["top1"])  # the last epoch is the final score
    ar.main(["--out", str(tmp_path / "tracked"), "--report", str(tmp_path / "r.md")])
    text = (tmp_path / "r.md").read_text()
    assert "## Per epoch" in text and (tmp_path / "r.png").is_file()
    g = 100 * tree[1]["test_conditional_gain"]
    assert f"| bal2_nocover | {100 * tree[0]['test_top1']:.2f} / " in text and f"/ {g:+.2f} |" in text
    # without --track no epoch is scored, and the report has no per-epoch part
    ar.main(common[:-2] + ["fpgm_kd", "--out", str(tmp_path / "plain")])
    assert all("test_top1" not in h for h in json.loads((tmp_path / "plain" / "results.json").read_text())
               ["rows"]["fpgm_kd"]["history"])
    ar.main(["--out", str(tmp_path / "plain"), "--report", str(tmp_path / "p.md")])
    assert "## Per epoch" not in (tmp_path / "p.md").read_text() and not (tmp_path / "p.png").exists()


def test_val_tail_width_and_augmentation_reach_the_run(tmp_path, monkeypatch):
    """--val-tail holds out the *last* images of the seeded permutation (unseen by a dense model pretrained with
    compare_baselines --train-limit N - val-size), --width reaches the model, the data set's augmentation reaches
    finetune, an impossible split is refused, and a later run's rows are named in the report."""
    import json
    import benchmarks.ablate_recipe as ar
    from sigmab_plugin.baselines.data import load_dataset
    data = load_dataset("digits")
    marker = lambda x, g: x  # noqa: E731
    data.augment = marker
    monkeypatch.setattr(ar, "load_dataset", lambda *a, **k: data)
    real_create, seen = ar.create_model, {}

    def create(*args, **kw):
        seen["width"] = kw.pop("width", None)
        return real_create(*args, **kw)

    real_machine, commit = ar.machine, {"now": "c-start"}
    monkeypatch.setattr(ar, "machine", lambda: {**real_machine(), "commit": commit["now"]})

    def fake_finetune(model, images, labels, norm, cfg, **kw):
        seen["train"], seen["augment"] = images, kw["augment"]
        commit["now"] = "c-later"  # a commit lands while the run trains: its rows ran the code it started with
        return [{"seconds": 1.0}]

    def fake_evaluate(model, images, labels, norm, **kw):
        seen["val"] = images
        return {"top1": 0.5}
    monkeypatch.setattr(ar, "create_model", create)
    monkeypatch.setattr(ar, "finetune", fake_finetune)
    monkeypatch.setattr(ar, "evaluate", fake_evaluate)
    common = ["--data", "digits", "--checkpoint", "", "--train-limit", "100", "--val-size", "64", "--epochs", "1"]
    ar.main(common + ["--val-tail", "--width", "0.5", "--variants", "fpgm_kd", "--out", str(tmp_path / "a")])
    perm = torch.randperm(len(data.train.labels), generator=torch.Generator().manual_seed(0))
    assert torch.equal(seen["val"], data.train.images[perm[-64:]])
    assert torch.equal(seen["train"], data.train.images[perm[:100]])
    assert seen["width"] == 0.5 and seen["augment"] is marker
    assert json.loads((tmp_path / "a" / "results.json").read_text())["rows"]["fpgm_kd"]["commit"] == "c-start"
    ar.main(common + ["--variants", "fpgm", "--out", str(tmp_path / "b")])  # default: the images after the training ones
    assert torch.equal(seen["val"], data.train.images[perm[100:164]]) and seen["width"] is None
    with pytest.raises(ValueError, match="--train-limit 1790 \\+ --val-size 64 exceeds"):
        ar.main(["--data", "digits", "--checkpoint", "", "--train-limit", "1790", "--val-size", "64",
                 "--variants", "fpgm", "--out", str(tmp_path / "c")])
    ar.main(common + ["--val-tail", "--variants", "fpgm", "--out", str(tmp_path / "a")])  # a later run, same folder
    assert json.loads((tmp_path / "a" / "results.json").read_text())["rows"]["fpgm"]["variants_of_run"] == ["fpgm"]
    ar.main(["--out", str(tmp_path / "a"), "--report", str(tmp_path / "r.md")])
    text = (tmp_path / "r.md").read_text()
    assert "Rows added by later runs into the same folder (their `--variants`): fpgm (`fpgm`)." in text
    assert "which the dense model's pretraining did not see" in text


def test_bn_routing_diag_rebuilds_the_runs_tree(tmp_path, capsys, monkeypatch):
    """benchmarks.bn_routing_diag rebuilds an ablation's tree from its recorded arguments: with running statistics
    it routes the validation split exactly as the ablation's own evaluation did."""
    import json
    import benchmarks.ablate_recipe as ar
    import benchmarks.bn_routing_diag as diag
    ar.main(["--data", "digits", "--checkpoint", "", "--train-limit", "128", "--val-size", "64", "--epochs", "1",
             "--batch-size", "32", "--variants", "bal2_nocover", "--out", str(tmp_path)])
    row = json.loads((tmp_path / "results.json").read_text())["rows"]["bal2_nocover"]
    capsys.readouterr()
    from sigmab_plugin.finetune import augment_batch as ft_augment
    seen = []
    monkeypatch.setattr(diag, "augment_batch", lambda b, g, flip: seen.append(len(b)) or ft_augment(b, g, flip))
    diag.main([str(tmp_path), "bal2_nocover", "bal2_nocover"])  # two variants: the loop reuses the run's arguments
    out = capsys.readouterr().out
    assert out.count(f"running statistics {row['leaf_histogram']}; batch statistics (batches of 32) [") == 2
    augmented = [json.loads(line.split("training augmentation ")[1]) for line in out.splitlines()]
    assert len(augmented) == 2 and augmented[0] == augmented[1] and sum(augmented[0]) == 64 and seen == [64]


def test_leaf_variant_fine_tunes_the_most_routed_path_as_a_plain_network(tmp_path, monkeypatch):
    import copy
    import json
    import benchmarks.ablate_recipe as ar
    from sigmab_plugin.baselines.data import load_dataset
    seen = {}
    real_export = sb.export_path

    def export(tree, leaf):
        seen["tree"], seen["leaf"] = copy.deepcopy(tree), leaf
        return real_export(tree, leaf)

    def fake_finetune(model, images, labels, norm, cfg, **kw):
        seen["model"] = model
        return [{"seconds": 1.0}]
    monkeypatch.setattr(ar.sb, "export_path", export)
    monkeypatch.setattr(ar, "finetune", fake_finetune)
    ar.main(["--data", "digits", "--checkpoint", "", "--train-limit", "128", "--val-size", "64", "--epochs", "1",
             "--variants", "nocover_leaf", "--out", str(tmp_path)])
    row = json.loads((tmp_path / "results.json").read_text())["rows"]["nocover_leaf"]
    tree, leaf, plain = seen["tree"].eval(), seen["leaf"], seen["model"].eval()
    assert not sb.is_branched(plain) and row["method"] == f"sigmab leaf {leaf}"
    data = load_dataset("digits")
    perm = torch.randperm(len(data.train.labels), generator=torch.Generator().manual_seed(0))
    calib = data.normalize(data.train.images[perm[:512]])
    assert leaf == int(torch.bincount(sb.route(tree, calib), minlength=4).argmax())  # the calibration's most routed
    with torch.no_grad():
        torch.testing.assert_close(plain(calib[:16]), sb.forward_leaf(tree, calib[:16], leaf))
    assert 0 < row["active_fraction"] <= 0.41  # one path of a tree built for 0.4 active
