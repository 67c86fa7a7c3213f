"""examples/compare_baselines.py end to end on a tiny configuration, and its argument errors."""
from __future__ import annotations

import csv
import importlib.util
import inspect
import json
import re
from pathlib import Path

import pytest
import torch

import sigmab_plugin as sb
from sigmab_plugin.baselines import provenance
from sigmab_plugin.baselines.harness import HarnessConfig
from sigmab_plugin.baselines.models import create_model
from conftest import modules_run, write_point_npz

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("compare_baselines", ROOT / "examples" / "compare_baselines.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)

TINY = ["--quiet", "--epochs", "1", "--pretrain-epochs", "1", "--train-limit", "192", "--test-limit", "96",
        "--calib-size", "64", "--batch-size", "64"]


def test_runs_end_to_end_and_records_one_budget(tmp_path, capsys, monkeypatch):
    from sigmab_plugin.baselines import harness

    calls = []  # machine() as the harness sees it, numbered: results.json must hold the run's start

    def numbered():
        calls.append(len(calls))
        return {**provenance.machine(), "call": calls[-1]}
    monkeypatch.setattr(harness, "machine", numbered)
    rows = cli.main(TINY + ["--out", str(tmp_path)])
    table = capsys.readouterr().out
    methods = ["dense", "sigmab", "fpgm", "hrank", "fpgm_nni"]
    assert [r["method"] for r in rows] == methods
    for name in methods:
        assert name in table
    for f in ("results.json", "results.csv", "top1_vs_active.png"):
        assert (tmp_path / f).stat().st_size > 0
    with open(tmp_path / "results.csv") as fh:
        assert [r["method"] for r in csv.DictReader(fh)] == methods
    recorded = json.loads((tmp_path / "results.json").read_text())["machine"]  # where the numbers came from
    assert recorded["commit"] and recorded["torch"] == torch.__version__ and recorded["date"].endswith("UTC")
    assert recorded["call"] == 0  # the commit whose code ran, not the one checked out when the run ended
    # every method got the same fine-tuning budget, data and seed ...
    for key in ("finetune", "train_images", "test_images", "seed", "data", "model"):
        assert len({json.dumps(r[key], sort_keys=True) for r in rows}) == 1, key
    # ... and every static method the same active-parameter budget: SigmaB's largest path, counted here
    # independently (forward hooks on the saved tree, each leaf forced)
    sig = next(r for r in rows if r["method"] == "sigmab")
    tree = sb.load_branched(create_model("resnet20", 10, shortcut="B"), tmp_path / "sigmab" / "tree")
    counts = []
    for leaf in range(4):
        ran = modules_run(tree, lambda: sb.forward_leaf(tree, torch.zeros(1, 3, 32, 32), leaf))
        routers = [r.routers[(leaf >> (2 - r.level)) >> 1] for r in tree.modules()
                   if isinstance(r, sb.routing.RoutedModule) and r.routers is not None]
        counts.append(sum(p.numel() for m in ran | {m for r in routers for m in r.modules()}
                          for p in m.parameters(recurse=False)))
    assert max(counts) == sig["active_params"]
    for r in rows:
        if r["method"] in ("fpgm", "hrank", "fpgm_nni"):
            assert r["budget"] == max(counts) and r["within_budget"]
            assert 0.9 * max(counts) <= r["active_params"] <= max(counts)
    assert sum(sig["leaf_histogram"]) == 96
    for name in methods:  # every method was distilled from the dense model (the flag reached training)
        log = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
        assert all(row["distill"] > 0 for row in log), name


def test_sweep_writes_one_plot_over_budgets(tmp_path):
    rows = cli.main(TINY + ["--methods", "sigmab", "fpgm", "--sweep", "0.5", "1.0", "--no-residual",
                            "--out", str(tmp_path)])
    assert len(rows) == 4 and (tmp_path / "top1_vs_active.png").is_file()
    assert (tmp_path / "keep0.5" / "results.json").is_file() and (tmp_path / "keep1.0" / "results.json").is_file()


def test_distill_zero_trains_without_teacher(tmp_path):
    rows = cli.main(TINY + ["--methods", "sigmab", "fpgm", "--distill", "0", "--out", str(tmp_path)])
    for r in rows:
        log = [json.loads(line) for line in (tmp_path / r["method"] / "log.jsonl").read_text().splitlines()]
        assert not r["distilled"] and all("distill" not in row for row in log)


def test_a_dense_only_run_builds_no_tree_for_a_budget(tmp_path, monkeypatch):
    def no_tree(*a, **k):
        raise AssertionError("a dense-only run (pretraining) branched a tree to size a budget it does not use")
    monkeypatch.setattr(sb, "branch", no_tree)
    rows = cli.main(TINY + ["--methods", "dense", "--epochs", "0", "--out", str(tmp_path)])
    assert [r["method"] for r in rows] == ["dense"] and (tmp_path / "pretrain" / "checkpoint.pt").is_file()


@pytest.mark.parametrize("reset", [False, True])
def test_pretraining_takes_its_lr_and_zeroes_the_classifier_when_asked(tmp_path, monkeypatch, reset):
    """--pretrain-lr reaches the pretraining's optimiser and --reset-classifier zeroes the checkpoint's classifier
    before it (transfer to other classes); without the flag the checkpoint's classifier trains as loaded."""
    from sigmab_plugin.baselines import harness
    ckpt = tmp_path / "dense.pt"
    torch.save(create_model("resnet20", 10, None, "B").state_dict(), ckpt)
    seen = []

    def spy(model, *a, **k):
        head = model.get_classifier()
        seen.append((a[3].lr, a[3].epochs, head.weight.abs().sum().item(), head.bias.abs().sum().item()))
        return []
    monkeypatch.setattr(harness, "finetune", spy)
    cli.main(TINY + ["--methods", "dense", "--epochs", "0", "--checkpoint", str(ckpt), "--pretrain-lr", "0.02",
                     "--out", str(tmp_path / "run")] + (["--reset-classifier"] if reset else []))
    (lr, epochs, weight, bias), = seen[:1]
    assert lr == 0.02 and epochs == 1
    assert (weight == 0 and bias == 0) if reset else weight > 0


def test_resumed_run_of_other_methods_keeps_the_folders_earlier_rows(tmp_path, monkeypatch):
    from sigmab_plugin.baselines import harness

    args = TINY + ["--epochs", "0", "--out", str(tmp_path)]
    monkeypatch.setattr(harness, "machine", lambda: {**provenance.machine(), "commit": "first"})
    cli.main(args + ["--methods", "dense", "hrank", "--resume"])
    monkeypatch.setattr(harness, "machine", lambda: {**provenance.machine(), "commit": "second"})
    first = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    cli.main(args + ["--methods", "fpgm", "hrank", "--resume"])  # a later run of some methods, one of them again
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert sorted(r["method"] for r in rows) == ["dense", "fpgm", "hrank"]
    by = {r["method"]: r for r in rows}
    assert by["dense"] == first["dense"] and by["dense"]["commit"] == "first"  # each row names the code it ran
    assert by["fpgm"]["commit"] == by["hrank"]["commit"] == "second"
    assert by["fpgm"]["delta_vs_dense_pp"] == pytest.approx(100 * (by["fpgm"]["top1"] - by["dense"]["top1"]))
    cli.main(args + ["--methods", "fpgm"])  # without --resume a run starts the folder afresh
    assert [r["method"] for r in json.loads((tmp_path / "results.json").read_text())["rows"]] == ["fpgm"]


def test_rows_name_their_dense_model_and_a_folder_never_mixes_two(tmp_path):
    """Every row carries the fingerprint of the dense model it started from; resuming a folder whose checkpoint or
    rows started from another dense model (a pretraining rerun to the same path) is refused before any training."""
    from sigmab_plugin.baselines.harness import run_comparison
    def seeded():
        torch.manual_seed(0)
        return create_model("resnet20", 10, None, "B")
    a, b, again = seeded(), seeded(), seeded()
    assert provenance.state_fingerprint(a) == provenance.state_fingerprint(again)  # same values, same fingerprint
    with torch.no_grad():
        b.conv1.weight[0, 0, 0, 0] += 1e-3  # one value apart
    assert provenance.state_fingerprint(a) != provenance.state_fingerprint(b)
    ckpt = tmp_path / "dense.pt"
    torch.save(a.state_dict(), ckpt)
    base = TINY + ["--pretrain-epochs", "0", "--checkpoint", str(ckpt), "--resume", "--out", str(tmp_path / "run")]
    rows = cli.main(base + ["--methods", "dense", "fpgm"])
    assert {r["dense_sha256"] for r in rows} == {provenance.state_fingerprint(a)}
    torch.save(b.state_dict(), ckpt)  # another dense model at the same path
    before = (tmp_path / "run" / "results.json").read_bytes()
    for methods, names in ((["hrank"], "the dense row of results.json, the fpgm row"), (["fpgm"], "fpgm's checkpoint")):
        with pytest.raises(ValueError, match=f"holds {names}.* started from another dense model"):
            run_comparison(cli.parse(base + ["--methods", *methods])[0])
    assert (tmp_path / "run" / "results.json").read_bytes() == before  # the folder is left as it was
    rows = cli.main(base[:-1] + [str(tmp_path / "run2"), "--methods", "hrank"])  # another folder: accepted
    assert rows[0]["dense_sha256"] == provenance.state_fingerprint(b)


def test_a_resumed_refit_run_reuses_its_start_and_refuses_another_refit(tmp_path, monkeypatch):
    from sigmab_plugin.baselines.harness import run_comparison

    base = TINY + ["--methods", "fpgm", "--epochs", "1", "--resume", "--out", str(tmp_path)]
    refit = ["--reconstruct", "--reconstruct-ridge", "0.5"]
    first = cli.main(base + refit)[0]
    keys = ("reconstruction", "top1_before_finetune", "top1")

    def no_refit(*a, **k):
        raise AssertionError("a resumed run refit the weights its checkpoint replaces")
    monkeypatch.setattr(sb, "reconstruct", no_refit)
    again = cli.main(base + refit)[0]  # the checkpoint holds the finished run: no refit, no evaluation before
    assert {k: again[k] for k in keys} == {k: first[k] for k in keys}
    for other in (["--reconstruct", "--reconstruct-ridge", "1.0"], []):  # its weights were refit at ridge 0.5
        with pytest.raises(ValueError, match="refit at ridge 0.5"):
            run_comparison(cli.parse(base + other)[0])
    ckpt = (tmp_path / "fpgm" / "checkpoint.pt").read_bytes()
    cli.main([a for a in base if a != "--resume"])  # without --resume: a fresh start, without a refit
    assert (tmp_path / "fpgm" / "checkpoint.pt").read_bytes() != ckpt


@pytest.mark.parametrize("flag", ["--calibrate-routing", "--no-calibrate-routing"])
def test_calibrate_routing_flag_reaches_the_saved_tree(tmp_path, flag):
    rows = cli.main(TINY + ["--methods", "sigmab", flag, "--out", str(tmp_path)])
    cal = rows[0]["routing_calibration"]
    trained = torch.load(tmp_path / "sigmab" / "checkpoint.pt", weights_only=True)["model"]
    tree = sb.load_branched(create_model("resnet20", 10, shortcut="B"), tmp_path / "sigmab" / "tree")
    moved = [k for k, v in tree.state_dict().items() if k.endswith(".balance") and not torch.equal(v, trained[k])]
    if flag == "--no-calibrate-routing":
        assert cal is None and not moved
        return
    log = [json.loads(line) for line in (tmp_path / "sigmab" / "log.jsonl").read_text().splitlines()]
    assert cal["leaf_mass"] == pytest.approx(log[-1]["train_leaf_share"])  # the training mass is the target
    assert cal["top1_before"] == log[-1]["test_top1"] and sum(rows[0]["leaf_histogram"]) == 96
    assert max(abs(a - b) for a, b in zip(cal["leaf_share_after"], cal["leaf_mass"])) <= 2 / cal["samples"] + 1e-9
    assert moved or cal["leaf_share_before"] == cal["leaf_share_after"]  # the offsets were saved with the tree


def test_channel_score_flag_reaches_the_saved_tree(tmp_path):
    cli.main(TINY + ["--methods", "sigmab", "--channel-score", "activation", "--out", str(tmp_path)])
    tree = sb.load_branched(create_model("resnet20", 10, shortcut="B"), tmp_path / "sigmab" / "tree")
    assert sb.tree_state(tree).spec["config"]["channel_score"] == "activation"
    assert cli.parse(TINY)[0].channel_score == "activation_weight" == sb.BranchConfig().channel_score
    from sigmab_plugin.baselines.harness import HarnessConfig
    from sigmab_plugin.torch_pruning import ActivationImportance
    assert HarnessConfig().channel_score == sb.BranchConfig().channel_score == \
        inspect.signature(ActivationImportance).parameters["score"].default  # one default everywhere


def test_reconstruct_flag_reaches_the_saved_tree(tmp_path, monkeypatch):
    ridges = []  # what sb.reconstruct was called with, per pruned model
    real = sb.reconstruct
    monkeypatch.setattr(sb, "reconstruct", lambda *a, **k: (ridges.append(k.get("ridge")), real(*a, **k))[1])
    trees = {}
    for flag in ("--reconstruct", "--no-reconstruct"):
        ridge = ["--reconstruct-ridge", "0.5", "fpgm=0.25"] if flag == "--reconstruct" else []
        rows = cli.main(TINY + ["--methods", "sigmab", "fpgm", flag, "--epochs", "0", "--out", str(tmp_path / flag)]
                        + ridge)
        for row in rows:  # the tree and the statically pruned model get the same step, each at its own ridge
            rec = row["reconstruction"]
            if flag == "--reconstruct":
                assert rec["layers"] > 0 and rec["mean_relative_error_after"] < rec["mean_relative_error_before"]
                assert rec["ridge"] == {"sigmab": 0.5, "fpgm": 0.25}[row["method"]]
            else:
                assert rec is None
        trees[flag] = sb.load_branched(create_model("resnet20", 10, shortcut="B"),
                                       tmp_path / flag / "sigmab" / "tree").state_dict()
    assert ridges == [0.5, 0.25]  # each ridge reached its refit, and nothing was refit without the flag
    same = trees["--reconstruct"].keys() == trees["--no-reconstruct"].keys()
    assert same and any(not torch.equal(v, trees["--no-reconstruct"][k]) for k, v in trees["--reconstruct"].items())


def test_recipe_flags_reach_the_config():
    cfg, _ = cli.parse(TINY + ["--objective", "mixture", "--balance-weight", "0.7", "--balance-rate", "0.01",
                               "--top-k", "2", "--bn-weighting", "--distill-paths", "weighted", "--coverage",
                               "--hard-epochs", "1", "--resume", "--calibrate-routing",
                               "--decisive-weight", "0.3", "--bn-mode", "shared", "--bn-recalibration-batches", "7",
                               "--route-inputs", "clean"])
    ft = cfg.finetune
    assert (ft.bn_mode, ft.bn_recalibration_batches, ft.route_inputs) == ("shared", 7, "clean")
    assert (ft.objective, ft.balance_weight, ft.balance_rate, ft.top_k, ft.bn_weighting, ft.distill_paths,
            ft.hard_epochs) == ("mixture", 0.7, 0.01, 2, True, "weighted", 1)
    assert cfg.coverage and cfg.resume and cfg.calibrate_routing and ft.loss().decisive_weight == 0.3
    assert cli.parse(TINY + ["--reconstruct", "--reconstruct-ridge", "1.0"])[0].reconstruct_ridge == 1.0
    mixed, _ = cli.parse(TINY + ["--reconstruct", "--reconstruct-ridge", "hrank=2", "0.1", "fpgm=1e0"])
    assert (mixed.reconstruct_ridge, mixed.reconstruct_ridges) == (0.1, {"hrank": 2.0, "fpgm": 1.0})
    assert (mixed.ridge("sigmab"), mixed.ridge("fpgm"), mixed.ridge("hrank")) == (0.1, 1.0, 2.0)
    default, _ = cli.parse(TINY)
    assert default.reconstruct_ridge == 0.01 and default.reconstruct_ridges == {} and not default.reconstruct
    assert not default.coverage and default.finetune.distill_weight == 1.0 and default.finetune.objective == "expected"
    assert default.device == ("cuda" if torch.cuda.is_available() else "cpu") and default.model_kwargs == {}
    points, _ = cli.parse(TINY + ["--device", "meta", "--data", "modelnet40", "--model", "pointnet2_ssg",
                                  "--width", "0.25"])
    assert points.device == "meta" and points.model_kwargs == {"width": 0.25} and not points.finetune.flip


@pytest.mark.parametrize("kwargs,message", [
    ({"target_fraction": 1.5}, "target_fraction=1.5 must lie in (0, 1)"),
    ({"keep_ratio": 0.0}, "keep_ratio=0.0 must lie in (0, 1]"),
    ({"reconstruct_ridge": -1.0}, "reconstruct_ridge=-1.0 must be > 0"),
    ({"reconstruct_ridges": {"hrank": float("nan")}}, "reconstruct_ridges['hrank']=nan must be > 0"),
    ({"keep_shape": [1.0]}, "keep_shape=[1.0] needs one positive number per level (depth 2)"),
    ({"router_grid": 0}, "router_grid=0 is out of range"),
    ({"keep_shape": [1.0, 0.0]}, "keep_shape=[1.0, 0.0] needs one positive number per level"),
    ({"static_shape": "layers"}, "static_shape='layers': choose from ('uniform', 'tree')"),
    ({"static_shape": "tree", "methods": ["sigmab", "fpgm_nni"]}, "static_shape='tree' is for fpgm and hrank"),
    ({"device": "cpux"}, "device='cpux' is not a torch device"),
    ({"reset_classifier": True}, "reset_classifier=True zeroes the dense model's classifier before its pretraining, "
                                 "but pretrain_epochs=0"),
    ({"pretrain_lr": 0.0, "pretrain_epochs": 1}, "pretrain_lr=0.0 must be > 0"),
])
def test_harness_config_is_validated(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        HarnessConfig(**kwargs).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_cuda_without_a_gpu_is_refused_before_the_run_folder_exists(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(TINY + ["--device", "cuda", "--out", str(tmp_path / "run")])
    assert exc.value.code == 2 and "device='cuda' but this machine has no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,message", [
    (["--methods", "magic"], "unknown method"),
    (["--keep-ratio", "1.5"], "keep ratio 1.5"),
    (["--data", "mnist"], "invalid choice"),
    (["--reconstruct", "--reconstruct-ridge", "0"], "reconstruct_ridge=0.0 must be > 0"),
    (["--reconstruct", "--reconstruct-ridge", "fpgm=0"], "reconstruct_ridges['fpgm']=0.0 must be > 0"),
    (["--reconstruct", "--reconstruct-ridge", "fpgm=big"], "--reconstruct-ridge 'fpgm=big': give a number"),
    (["--reconstruct", "--reconstruct-ridge", "fpmg=1"], "reconstruct_ridges names 'fpmg', not a pruned method"),
    (["--reconstruct", "--reconstruct-ridge", "dense=1"], "reconstruct_ridges names 'dense'"),
    (["--reconstruct-ridge", "1"], "add --reconstruct"),  # a ridge without the refit would do nothing
])
def test_argument_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(TINY + args)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--model", "resnet999"], "unknown model 'resnet999'"),
    (["--target-fraction", "0.01", "--methods", "sigmab"], "target active fraction 0.01"),
])
def test_runtime_errors_are_reported(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main(TINY + args + ["--out", str(tmp_path)])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["ssg", "msg"])
def test_pointnet_runs_every_method_through_the_harness(tmp_path, variant):
    """Issue 9: SigmaB, FPGM and HRank on both PointNet++ variants through the same harness and CLI: every
    static method within SigmaB's largest path, the tree's routing of every test cloud recorded, mean-class
    top-1 reported."""
    import timm
    write_point_npz(tmp_path / "data")
    methods = ["sigmab", "fpgm", "hrank"]
    rows = cli.main(["--quiet", "--epochs", "1", "--calib-size", "32", "--batch-size", "16", "--data", "modelnet40",
                     "--data-root", str(tmp_path / "data"), "--model", f"pointnet2_{variant}", "--width", "0.125",
                     "--keep-ratio", "0.5", "--device", "cpu", "--methods", *methods, "--out", str(tmp_path / "out")])
    assert [r["method"] for r in rows] == methods
    dense = sum(p.numel() for p in timm.create_model(f"pointnet2_{variant}", num_classes=4, width=0.125).parameters())
    sig = rows[0]
    budget = sig["active_params"]
    assert sig["stored_params"] > dense > budget and sum(sig["leaf_histogram"]) == 16
    assert len(sig["leaf_top1_all"]) == 4 and sig["oracle_top1"] >= max(sig["leaf_top1_all"])
    for r in rows:
        assert r["model"] == f"pointnet2_{variant}" and r["test_images"] == 16 and 0.0 <= r["mean_class_top1"] <= 1.0
        if r["method"] != "sigmab":
            assert r["budget"] == budget and r["within_budget"] and 0.85 * budget <= r["active_params"] <= budget


# every option of compare_baselines.py, a value other than its default, and the config field it must change
# ("sweep": the returned budgets); prerequisites (the ridge needs --reconstruct) go in both parses
EVERY_FLAG = {
    "model": (["--model", "resnet32"], "model"), "data": (["--data", "cifar10-jpeg"], "data"),
    "data_root": (["--data-root", "elsewhere"], "data_root"), "checkpoint": (["--checkpoint", "w.th"], "checkpoint"),
    "width": (["--width", "0.5"], "model_kwargs"), "shortcut": (["--shortcut", "A"], "shortcut"),
    "methods": (["--methods", "fpgm"], "methods"), "depth": (["--depth", "3"], "depth"),
    "keep_ratio": (["--keep-ratio", "0.7"], "keep_ratio"), "no_residual": (["--no-residual"], "prune_residual"),
    "coverage": (["--coverage"], "coverage"), "channel_score": (["--channel-score", "activation"], "channel_score"),
    "target_fraction": (["--target-fraction", "0.4"], "target_fraction"), "sweep": (["--sweep", "0.5", "1"], "sweep"),
    "keep_shape": (["--keep-shape", "1", "0.7"], "keep_shape"),
    "router_grid": (["--router-grid", "2"], "router_grid"),
    "static_shape": (["--static-shape", "tree"], "static_shape"),
    "epochs": (["--epochs", "2"], "finetune.epochs"), "pretrain_epochs": (["--pretrain-epochs", "3"], "pretrain_epochs"),
    "pretrain_lr": (["--pretrain-lr", "0.02"], "pretrain_lr"),
    "reset_classifier": (["--reset-classifier", "--pretrain-epochs", "1"], "reset_classifier"),
    "lr": (["--lr", "0.05"], "finetune.lr"), "batch_size": (["--batch-size", "32"], "finetune.batch_size"),
    "distill": (["--distill", "0.5"], "finetune.distill_weight"),
    "distill_paths": (["--distill-paths", "weighted"], "finetune.distill_paths"),
    "objective": (["--objective", "mixture"], "finetune.objective"),
    "balance_weight": (["--balance-weight", "0.5"], "finetune.balance_weight"),
    "balance_rate": (["--balance-rate", "0.1"], "finetune.balance_rate"),
    "decisive_weight": (["--decisive-weight", "0.5"], "finetune.decisive_weight"),
    "top_k": (["--top-k", "2"], "finetune.top_k"), "bn_weighting": (["--bn-weighting"], "finetune.bn_weighting"),
    "bn_mode": (["--bn-mode", "shared"], "finetune.bn_mode"),
    "bn_recalibration_batches": (["--bn-recalibration-batches", "5"], "finetune.bn_recalibration_batches"),
    "route_inputs": (["--route-inputs", "clean"], "finetune.route_inputs"),
    "node_lr_scale": (["--no-node-lr-scale"], "finetune.node_lr_scale"),
    "hard_epochs": (["--hard-epochs", "1"], "finetune.hard_epochs"),
    "calibrate_routing": (["--calibrate-routing"], "calibrate_routing"),
    "reconstruct": (["--reconstruct"], "reconstruct"),
    "reconstruct_ridge": (["--reconstruct", "--reconstruct-ridge", "1.0"], "reconstruct_ridge"),
    "resume": (["--resume"], "resume"), "train_limit": (["--train-limit", "100"], "train_limit"),
    "test_limit": (["--test-limit", "50"], "test_limit"), "calib_size": (["--calib-size", "64"], "calib_size"),
    "seed": (["--seed", "3"], "seed"), "device": (["--device", "meta"], "device"),
    "out": (["--out", "elsewhere"], "out_dir"), "quiet": (["--quiet"], "finetune.progress"),
}


# options that set the process, not the config, each with the test that fails when it stops taking effect
PROCESS_FLAGS = {"keep_freed_memory": "test_allocator.py::test_compare_baselines_keeps_freed_memory_unless_told_not_to"}


def _field(parsed, name):
    cfg, sweep = parsed
    if name == "sweep":
        return sweep
    value = cfg
    for part in name.split("."):
        value = getattr(value, part)
    return value


def test_every_option_reaches_the_config():
    """A flag that parses but changes nothing is the bug this guards against (``--distill`` once never reached
    training): each option, given a value other than its default, changes the field it names; an option added
    to the parser without an entry here fails the test."""
    dests = {a.dest for a in cli.parser()._actions if a.dest != "help"} - set(PROCESS_FLAGS)
    assert dests == set(EVERY_FLAG), f"options without a check: {dests - set(EVERY_FLAG)}; stale: {set(EVERY_FLAG) - dests}"
    allocator_tests = (Path(__file__).parent / "test_allocator.py").read_text()
    assert all(f"def {t.split('::')[1]}(" in allocator_tests for t in PROCESS_FLAGS.values())  # the check exists
    for dest, (args, name) in EVERY_FLAG.items():
        before = ["--reconstruct"] if dest == "reconstruct_ridge" else []
        old, new = _field(cli.parse(before), name), _field(cli.parse(args), name)
        assert old != new, f"{args} left {name} at {old!r}"
