"""benchmarks.report_long renders any comparison folder: rows, margins, goals, its own stem and plot."""
import json

import pytest

from benchmarks import report_long


def _row(method, frac, top1, **extra):
    r = {"method": method, "active_fraction": frac, "top1": top1, "mean_class_top1": top1 - 0.02, "seed": 0,
         "model": "pointnet2_ssg", "data": "modelnet40", "finetune": {"epochs": 2, "node_lr_scale": True}, "train_images": 9843,
         "test_images": 2468, "train_images_per_second": 20.0}
    if method == "sigmab":
        r.update(leaf_histogram=[600, 700, 500, 668], best_leaf_top1=top1 - 0.01, oracle_top1=top1 + 0.05,
                 conditional_gain=0.01, channel_score=report_long.HarnessConfig.channel_score)
    return {**r, **extra}


def _config(frac):  # a run of today's harness: its config names the tree's channel score
    return {"target_fraction": frac, "channel_score": report_long.HarnessConfig.channel_score}


def test_report_for_a_new_comparison(tmp_path):
    for frac, rows in ((0.4, [_row("dense", 1.0, 0.88, top1_before_finetune=0.9), _row("sigmab", 0.39, 0.87), _row("fpgm", 0.39, 0.85),
                              _row("hrank", 0.39, 0.84)]),
                       (0.3, [_row("sigmab", 0.29, 0.86, routing_calibration={
                           "leaf_mass": [0.25] * 4, "top1_before": 0.84, "leaf_histogram_before": [100, 0, 1368, 1000]}),
                               _row("fpgm", 0.29, 0.83)])):
        d = tmp_path / "runs" / f"pointnet2_ssg_f{frac:.2f}_s0"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"config": _config(frac), "rows": rows}))
    out = tmp_path / "out"
    report_long.main(str(tmp_path / "runs"), str(out), "modelnet40", "benchmarks/modelnet40.sh", "1.72")
    text = (out / "modelnet40.md").read_text()
    assert "`bash benchmarks/modelnet40.sh`" in text and "(goal <= 1.72)" in text
    assert "| sigmab | 0.4 | 0 | 0.390 | 87.00 | 85.00 | -1.00 |" in text
    assert "scored 90.00%: sigmab at 0.40 is -3.00 pp from it" in text
    assert "+2.00 pp" in text and "+3.00 pp" in text  # margins over FPGM at 0.40 and 0.30
    # how the goal compares with the dense model: FPGM 85% + 2 pp = 87%, 1 pp below dense's 88%
    assert "(goal >= +2; the goal asks for 87.00%, -1.00 pp from the dense model fine-tuned the same way)" in text
    assert "calibrated to the training mass 25/25/25/25% (`calibrate_routing`): top-1 84.00% -> 86.00%, test leaf " \
        "shares 4/0/55/41 -> 24/28/20/27%" in text
    assert (out / "modelnet40.png").stat().st_size > 0
    summary = json.loads((out / "modelnet40.json").read_text())["summary"]["pointnet2_ssg"]
    # the calibrated tree is its own variant: its margin is not averaged with the plain tree's
    assert abs(summary["margins"]["sigmab+calibrated"]["0.3"]["margin_pp"] - 3.0) < 1e-9
    assert "0.3" not in summary["margins"]["sigmab"] and "| sigmab+calibrated | 0.3 | 0 |" in text


def test_prior_report_fills_missing_runs_and_rows_say_where_they_came_from(tmp_path):
    d = tmp_path / "runs" / "m_f0.30_s0"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"config": _config(0.3), "machine": {"commit": "abc1234", "cpu": "Xeon",
                                                                                  "gpu": "NVIDIA H200"},
                                                "rows": [_row("sigmab", 0.29, 0.80), _row("fpgm", 0.29, 0.78)]}))
    prior_rows = [{**_row("sigmab", 0.39, 0.86), "run": "m_f0.40_s0", "target": 0.4},
                  {**_row("fpgm", 0.39, 0.85), "run": "m_f0.40_s0", "target": 0.4},
                  {**_row("fpgm", 0.29, 0.10), "run": "m_f0.30_s0", "target": 0.3}]  # superseded by the run dir
    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps({"rows": prior_rows}))
    out = tmp_path / "out"
    report_long.cli([str(tmp_path / "runs"), str(out), "--prior", str(prior)])
    text = (out / "long_comparison.md").read_text()
    # where each row was measured, not only where the report was written (GPU runs reported on a CPU)
    assert "- m_f0.30_s0: run at commit abc1234 on NVIDIA H200." in text
    assert f"- m_f0.40_s0: from the earlier report `{prior}` (written ? at commit ?)." in text
    rows = json.loads((out / "long_comparison.json").read_text())["rows"]
    assert sorted((r["run"], r["method"], r["top1"]) for r in rows) == [
        ("m_f0.30_s0", "fpgm", 0.78), ("m_f0.30_s0", "sigmab", 0.80), ("m_f0.40_s0", "fpgm", 0.85),
        ("m_f0.40_s0", "sigmab", 0.86)]
    # the written report can itself be the prior of the next one: its rows keep their origin
    report_long.cli([str(tmp_path / "runs"), str(tmp_path / "out2"), "--prior", str(out / "long_comparison.json")])
    assert f"- m_f0.40_s0: from the earlier report `{prior}` (written ? at commit ?)." in \
        (tmp_path / "out2" / "long_comparison.md").read_text()


def test_a_folder_with_methods_run_at_two_commits_names_each(tmp_path):
    d = tmp_path / "runs" / "m_f0.30_s1"
    d.mkdir(parents=True)  # fpgm ran first, then a later resumed run of hrank rewrote the folder's machine
    (d / "results.json").write_text(json.dumps({"config": _config(0.3), "machine": {"commit": "bbb2222"},
                                                "rows": [_row("fpgm", 0.29, 0.78, commit="aaa1111"),
                                                         _row("hrank", 0.29, 0.76, commit="bbb2222")]}))
    report_long.cli([str(tmp_path / "runs"), str(tmp_path / "out")])
    text = (tmp_path / "out" / "long_comparison.md").read_text()
    assert "- m_f0.30_s1: run at commit aaa1111." in text and "- m_f0.30_s1: run at commit bbb2222." in text


def test_report_names_how_its_script_runs_and_the_gpu(tmp_path, monkeypatch):
    assert report_long.command("benchmarks/modelnet40.sh") == "bash benchmarks/modelnet40.sh"
    assert report_long.command("benchmarks/gpu_modelnet40.py") == "python -m benchmarks.gpu_modelnet40"
    d = tmp_path / "runs" / "pointnet2_ssg_f0.40_s0"
    d.mkdir(parents=True)
    rows = [_row("sigmab", 0.39, 0.87), _row("fpgm", 0.39, 0.85)]
    (d / "results.json").write_text(json.dumps({"config": _config(0.4), "rows": rows}))
    m = report_long.machine()
    monkeypatch.setattr(report_long, "machine", lambda: {**m, "gpu": "NVIDIA H200"})
    report_long.main(str(tmp_path / "runs"), str(tmp_path / "out"), "modelnet40_gpu", "benchmarks/gpu_modelnet40.py",
                     "1.72")
    text = (tmp_path / "out" / "modelnet40_gpu.md").read_text()
    assert "by `python -m benchmarks.gpu_modelnet40` then" in text and "NVIDIA H200." in text


def test_prior_that_is_missing_is_refused(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="--prior .*no such report"):
        report_long.cli([str(tmp_path), str(tmp_path / "o"), "--prior", str(tmp_path / "nope.json")])


def test_reconstructed_rows_are_their_own_variant_against_the_best_static_of_any_variant(tmp_path):
    recon = {"layers": 20, "samples": {"0": 512}}
    for name, rows in (("m_f0.30_s0", [_row("sigmab", 0.29, 0.80), _row("fpgm", 0.29, 0.79)]),
                       ("m_f0.30_s0_recon", [_row("sigmab", 0.29, 0.84, reconstruction=recon),
                                             _row("fpgm", 0.29, 0.78, reconstruction=recon)]),
                       ("m_f0.30_s0_recon1", [_row("fpgm", 0.29, 0.785, reconstruction={**recon, "ridge": 1.0})])):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"config": _config(0.3), "rows": rows}))
    out = tmp_path / "out"
    report_long.main(str(tmp_path / "runs"), str(out))
    text = (out / "long_comparison.md").read_text()
    assert "| sigmab+recon | 0.3 | 0 | 0.290 | 84.00 |" in text and "| fpgm+recon | 0.3 | 0 | 0.290 | 78.00 |" in text
    assert "| fpgm+recon@1 | 0.3 | 0 | 0.290 | 78.50 |" in text  # another ridge: another recipe, not averaged
    margins = json.loads((out / "long_comparison.json").read_text())["summary"]["pointnet2_ssg"]["margins"]
    # never averaged across variants (that would give sigmab 82%), and the best static is plain FPGM (79%)
    assert margins["sigmab"]["0.3"]["sigmab"] == 0.80 and margins["sigmab+recon"]["0.3"]["sigmab"] == 0.84
    assert margins["sigmab+recon"]["0.3"]["best_static"] == "fpgm"
    assert abs(margins["sigmab+recon"]["0.3"]["margin_pp"] - 5.0) < 1e-9
    assert "- At 0.3 active: sigmab+recon 84.00% vs best static (fpgm) 79.00% on seed 0: **+5.00 pp**" in text


def test_margins_pair_seeds_so_a_one_seed_static_is_not_read_against_the_trees_two_seed_mean(tmp_path):
    runs = {"m_f0.40_s0": [_row("sigmab", 0.39, 0.83), _row("fpgm", 0.39, 0.82)],
            "m_f0.40_s1": [_row("sigmab", 0.39, 0.81, seed=1), _row("fpgm", 0.39, 0.80, seed=1)],
            "m_f0.40_s0_treealloc": [_row("fpgm", 0.39, 0.825, static_shape={"layer2": 0.6, "layer3": 0.6})]}
    for name, rows in runs.items():
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"config": _config(0.4), "rows": rows}))
    report_long.main(str(tmp_path / "runs"), str(tmp_path / "out"))
    mg = json.loads((tmp_path / "out" / "long_comparison.json").read_text())["summary"]["pointnet2_ssg"]["margins"]
    # fpgm on both seeds: +1.0 pp; fpgm+tree_alloc on seed 0 only: 83.0 - 82.5 = +0.5 pp (not 82.0 - 82.5 = -0.5)
    m = mg["sigmab"]["0.4"]
    assert m["best_static"] == "fpgm+tree_alloc" and m["seeds"] == [0]
    assert m["margin_pp"] == pytest.approx(0.5) and m["sigmab"] == pytest.approx(0.83)
    assert m["sigmab_all_seeds"] == pytest.approx(0.82)
    text = (tmp_path / "out" / "long_comparison.md").read_text()
    assert "vs best static (fpgm+tree_alloc) 82.50% on seed 0: **+0.50 pp**" in text


def test_reduction_at_matched_top1_is_read_between_measured_active_fractions(tmp_path):
    runs = {0.3: [_row("sigmab", 0.29, 0.80)], 0.4: [_row("sigmab", 0.39, 0.82), _row("fpgm", 0.39, 0.81)],
            0.55: [_row("fpgm", 0.53, 0.83), _row("hrank", 0.54, 0.825)]}
    for frac, rows in runs.items():
        d = tmp_path / "runs" / f"m_f{frac:.2f}_s0"
        d.mkdir(parents=True)
        (d / "results.json").write_text(json.dumps({"config": _config(frac), "rows": rows}))
    out = tmp_path / "out"
    report_long.main(str(tmp_path / "runs"), str(out))
    # SigmaB: 80% at 0.29, 82% at 0.39 -> 83% at 0.44 (extrapolated); FPGM reached 83% at 0.53, not at the 0.55 budget
    summary = json.loads((out / "long_comparison.json").read_text())["summary"]["pointnet2_ssg"]
    frac, extrapolated = summary["sigmab_fraction_at_static_0.55"]["sigmab"]
    assert abs(frac - 0.44) < 1e-9 and extrapolated
    assert "(fpgm) reaches 83.00% at 0.530 active; sigmab needs 0.440 (extrapolated): 9.0 pp more reduction" in \
        (out / "long_comparison.md").read_text()


def test_fraction_at_interpolates_between_the_bracketing_budgets():
    from benchmarks.report_long import fraction_at
    pts = {0.30: 0.80, 0.40: 0.83, 0.45: 0.84}
    assert fraction_at(pts, 0.815) == pytest.approx((0.35, False))  # between 0.30 and 0.40, not from the top pair
    assert fraction_at(pts, 0.835) == pytest.approx((0.425, False))
    f, extrapolated = fraction_at(pts, 0.85)  # beyond the best: the top two budgets, flagged
    assert f == pytest.approx(0.50) and extrapolated
    f, extrapolated = fraction_at(pts, 0.79)
    assert f == pytest.approx(0.2667, abs=1e-4) and extrapolated
    assert fraction_at({0.4: 0.8}, 0.8) is None and fraction_at({0.3: 0.8, 0.4: 0.8}, 0.9) is None


NOW = {"node_lr_scale": True}  # a row of today's harness carries every FinetuneConfig field


def test_a_tree_trained_with_another_recipe_is_its_own_variant():
    from benchmarks.report_long import variant
    plain = _row("sigmab", 0.39, 0.87)
    assert variant(plain) == "sigmab" and variant({**plain, "finetune": {**NOW, "epochs": 2, "balance_weight": 2.0}}) == "sigmab"
    decisive = {**plain, "finetune": {**NOW, "epochs": 2, "decisive_weight": 0.5, "distill_paths": "weighted"}}
    assert variant(decisive) == "sigmab+decisive_weight=0.5+distill_paths=weighted"
    assert variant({**decisive, "reconstruction": {"ridge": 1.0}}) == \
        "sigmab+decisive_weight=0.5+distill_paths=weighted+recon@1"
    assert variant({**_row("fpgm", 0.39, 0.85), "finetune": {**NOW, "decisive_weight": 0.5}}) == "fpgm"  # no router
    assert variant({**plain, "finetune": {**NOW, "top_k": 2, "bn_weighting": True}}) == "sigmab+top_k=2+bn_weighting=True"
    assert variant({**plain, "finetune": {**NOW, "bn_mode": "shared"}}) == "sigmab+bn_mode=shared"
    assert variant({**plain, "finetune": {**NOW, "route_inputs": "clean"}}) == "sigmab+route_inputs=clean"
    fpgm = _row("fpgm", 0.39, 0.85)
    assert variant({**fpgm, "finetune": {**NOW, "bn_mode": "frozen"}}) == "fpgm+bn_mode=frozen"  # its training changed
    assert variant({**fpgm, "finetune": {**NOW, "bn_mode": "shared"}}) == "fpgm"  # nothing shared to freeze
    assert variant({**fpgm, "finetune": {**NOW, "route_inputs": "clean"}}) == "fpgm"  # no router
    assert variant({**plain, "channel_score": "activation"}) == "sigmab+channel_score=activation"
    # a row from before node_lr_scale existed trained without it (the default since): named by it
    assert variant({**plain, "finetune": {"epochs": 2}}) == "sigmab+node_lr_scale=False"
    assert variant({**plain, "finetune": {"epochs": 2, "node_lr_scale": False}}) == "sigmab+node_lr_scale=False"
    assert variant({**fpgm, "finetune": {"epochs": 2}}) == "fpgm"  # no nodes to scale
    legacy = {k: v for k, v in plain.items() if k != "channel_score"}  # a row from before the option
    assert variant(legacy) == "sigmab+channel_score=activation"
    # per-level keep ratios (harness --keep-shape) and a static method given the tree's allocation (--static-shape)
    assert variant({**plain, "keep_ratio": [0.76, 0.532]}) == "sigmab+keep_shape=1:0.7"
    assert variant({**plain, "keep_ratio": 0.59}) == "sigmab"
    assert variant({**fpgm, "static_shape": {"layer2": 0.6, "layer3": 0.6}}) == "fpgm+tree_alloc"
    # the allocation of a tree with per-level keep ratios is another variant, not averaged with the flat one
    assert variant({**fpgm, "static_shape": {"layer2": 0.76, "layer3": 0.532, "pool": 0.532}}) == "fpgm+tree_alloc=1:0.7"
    assert variant({**fpgm, "static_shape": None}) == "fpgm"
    # routers over a grid of cells (harness --router-grid); a row from before the option pooled globally
    assert variant({**plain, "router_grid": 2}) == "sigmab+router_grid=2"
    assert variant({**plain, "router_grid": 1}) == variant(plain) == "sigmab"
    assert variant({**fpgm, "router_grid": 2}) == "fpgm"  # no router



def test_a_budget_only_the_tree_ran_at_has_no_margin_but_reads_the_matched_fraction():
    rows = [{**_row(m, f, t), "run": f"m_f{tgt}", "target": tgt, "variant": m}
            for m, f, t, tgt in [("sigmab", 0.29, 0.80, 0.3), ("fpgm", 0.29, 0.78, 0.3), ("sigmab", 0.39, 0.83, 0.4),
                                 ("fpgm", 0.39, 0.82, 0.4), ("sigmab", 0.43, 0.84, 0.45), ("fpgm", 0.53, 0.835, 0.55)]]
    s = report_long.summarize(rows)["pointnet2_ssg"]
    assert set(s["margins"]["sigmab"]) == {"0.3", "0.4"}  # no static row at 0.45: no margin against 0%
    frac, extrapolated = s["sigmab_fraction_at_static_0.55"]["sigmab"]
    assert frac == pytest.approx(0.41) and not extrapolated  # between the 0.39 and 0.43 runs


def test_plot_gives_each_method_one_colour_in_every_panel(tmp_path):
    from benchmarks.report_long import plot
    rows = [{"model": m, "data": "d", "variant": v, "method": v, "active_fraction": f, "top1": 0.8}
            for m, vs in (("a", ("hrank", "sigmab")), ("b", ("fpgm", "sigmab"))) for v in vs for f in (0.3, 0.4)]
    fig = plot(rows, tmp_path / "p.png")
    colours = [{label: h.lines[0].get_color() for h, label in zip(*ax.get_legend_handles_labels())}
               for ax in fig.axes]
    assert colours[0]["sigmab"] == colours[1]["sigmab"]
    assert len({*colours[0].values(), *colours[1].values()}) == 3  # hrank, fpgm and sigmab all differ


def test_keep_ratio_steps_are_whole_channels():
    from benchmarks.keep_ratio_steps import steps
    from conftest import images, make_model
    dense = make_model("resnet")
    got = steps(dense, images(64), [0.5, 0.5, 0.75, 1.0], depth=1, seed=0)
    fractions = [f for _, f in got]
    assert fractions[0] == fractions[1] and fractions[1] < fractions[2] < fractions[3]  # same keep, same tree
    assert [k for k, _ in got] == [0.5, 0.5, 0.75, 1.0]
    assert sum(p.numel() for p in dense.parameters()) == sum(p.numel() for p in make_model("resnet").parameters())


@pytest.mark.parametrize("default", ["activation", "activation_weight"])
def test_a_tree_ranked_by_another_channel_score_is_its_own_variant(tmp_path, monkeypatch, default):
    monkeypatch.setattr(report_long.HarnessConfig, "channel_score", default)
    # a run from before the option (no channel_score in its config) ranked channels by activation
    for name, score, top1 in (("m_f0.40_s0", None, 0.80), ("m_f0.40_s0_aw", "activation_weight", 0.83)):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        config = {"target_fraction": 0.4, **({} if score is None else {"channel_score": score})}
        rows = [_row("sigmab", 0.39, top1), _row("fpgm", 0.39, 0.81)]
        (d / "results.json").write_text(json.dumps({"config": config, "rows": rows}))
    report_long.main(str(tmp_path / "runs"), str(tmp_path / "out"))
    margins = json.loads((tmp_path / "out" / "long_comparison.json").read_text())["summary"]["pointnet2_ssg"]["margins"]
    old, new = (("sigmab", "sigmab+channel_score=activation_weight") if default == "activation" else
                ("sigmab+channel_score=activation", "sigmab"))
    assert set(margins) == {old, new}  # never averaged together (that would give 81.5%)
    assert margins[old]["0.4"]["sigmab"] == 0.80 and margins[new]["0.4"]["sigmab"] == 0.83
    text = (tmp_path / "out" / "long_comparison.md").read_text()
    assert text.count("| fpgm | 0.4 |") == 2 and "fpgm+channel_score" not in text  # static rows carry no tree score


def test_regenerating_keeps_the_sections_written_by_hand_under_the_plot(tmp_path):
    d = tmp_path / "runs" / "pointnet2_ssg_f0.40_s0"
    d.mkdir(parents=True)
    rows = [_row("dense", 1.0, 0.88), _row("sigmab", 0.39, 0.87), _row("fpgm", 0.39, 0.85)]
    (d / "results.json").write_text(json.dumps({"config": _config(0.4), "rows": rows}))
    out = tmp_path / "out"
    report_long.main(str(tmp_path / "runs"), str(out))
    md = out / "long_comparison.md"
    assert md.read_text().rstrip().endswith("![top-1 vs active fraction](long_comparison.png)")
    note = "## How this was run (written by hand)\n\n`bash benchmarks/long_comparison.sh r20`\n"
    md.write_text(md.read_text() + note)
    rows[1]["top1"] = 0.86  # a new result: the tables change, the hand-written section stays
    (d / "results.json").write_text(json.dumps({"config": _config(0.4), "rows": rows}))
    report_long.main(str(tmp_path / "runs"), str(out))
    text = md.read_text()
    assert "| sigmab | 0.4 | 0 | 0.390 | 86.00 |" in text and "| sigmab | 0.4 | 0 | 0.390 | 87.00 |" not in text
    assert text.endswith(note) and text.count(note) == 1
    assert text.index("![top-1 vs active fraction]") < text.index("## How this was run")
    report_long.main(str(tmp_path / "runs"), str(out))  # and again: kept once, not doubled
    assert md.read_text() == text


def test_rows_from_two_dense_models_are_never_compared_with_each_other(tmp_path):
    """A pretraining rerun to the same checkpoint path gives another dense model: its rows get their own section and
    panel (margins, vs dense), and a row from before the fingerprint joins the fingerprinted model of its top-1."""
    old = {"dense_reference_top1": 0.778}  # the committed rows: no fingerprint
    new = {"dense_reference_top1": 0.7743, "dense_sha256": "abcdef0123456789"}
    prior_rows = [{**_row(m, f, t, **old), "run": "m_f0.40_s0", "target": 0.4}
                  for m, f, t in (("dense", 1.0, 0.752), ("sigmab", 0.39, 0.7115), ("fpgm", 0.39, 0.7196))]
    prior = tmp_path / "prior.json"
    prior.write_text(json.dumps({"rows": prior_rows}))
    d = tmp_path / "runs" / "m_f0.40_s0_nodelr"
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps({"config": _config(0.4), "rows": [
        _row("sigmab", 0.39, 0.7233, **new), _row("fpgm", 0.39, 0.7123, **new)]}))
    out = tmp_path / "out"
    report_long.cli([str(tmp_path / "runs"), str(out), "modelnet40", "benchmarks/modelnet40.sh", "1.72",
                     "--prior", str(prior)])
    summary = json.loads((out / "modelnet40.json").read_text())["summary"]
    a, b = "pointnet2_ssg from dense 77.80%", "pointnet2_ssg from dense 77.43% abcdef01"
    assert set(summary) == {a, b}
    assert summary[a]["margins"]["sigmab"]["0.4"]["margin_pp"] == pytest.approx(-0.81)  # not FPGM's two-model mean
    assert summary[b]["margins"]["sigmab"]["0.4"]["margin_pp"] == pytest.approx(1.10)
    assert summary[a]["dense_top1"] == 0.752 and summary[b]["dense_top1"] is None
    text = (out / "modelnet40.md").read_text()
    assert f"## {b}:" in text and "| sigmab | 0.4 | 0 | 0.390 | 72.33 | 70.33 |  |" in text  # no dense row to read
    assert "sigmab at 0.40 is 5.10 pp below the dense model it started from (77.43%, not fine-tuned again" in text
    # the same dense model, once without and once with its fingerprint: one section
    rows = [{**_row("fpgm", 0.39, 0.8), "dense_reference_top1": 0.778, "run": "x", "target": 0.4},
            {**_row("sigmab", 0.39, 0.81), **new, "dense_reference_top1": 0.778, "run": "y", "target": 0.4}]
    report_long.assign_panels(rows)
    assert {r["panel"] for r in rows} == {"pointnet2_ssg"}
    # fine-tuned for 1 and for 3 epochs: two sections, never one margin over both
    rows[1]["finetune"] = {**rows[1]["finetune"], "epochs": 3}
    report_long.assign_panels(rows)
    assert [r["panel"] for r in rows] == ["pointnet2_ssg, 2 epochs", "pointnet2_ssg, 3 epochs"]
    # a heading names the epochs once, whether or not the panel's name carries them
    s = {"epochs": 3, "train_images": 9843, "test_images": 2468}
    assert report_long.heading("pointnet2_ssg, 3 epochs", s) == \
        "## pointnet2_ssg, 3 epochs: fine-tuned on 9,843 images, 2,468 test images"
    assert report_long.heading("pointnet2_ssg", {**s, "epochs": 1}) == \
        "## pointnet2_ssg: 1 epoch of fine-tuning on 9,843 images, 2,468 test images"
    assert [list(g) for g in report_long.by_panel(rows).values()] == [[rows[0]], [rows[1]]]


def test_rows_trained_with_freed_memory_kept_are_marked_beside_their_speed(tmp_path):
    d = tmp_path / "runs" / "m_f0.40_s0"
    d.mkdir(parents=True)  # fpgm ran at an older commit, before the allocator setting; sigmab with it kept
    rows = [_row("fpgm", 0.39, 0.8, commit="old1234"), _row("sigmab", 0.39, 0.81, commit="new5678"),
            _row("hrank", 0.39, 0.7, commit="new5678", freed_memory_kept=False)]
    (d / "results.json").write_text(json.dumps({"config": _config(0.4), "rows": rows,
                                                "machine": {"commit": "new5678", "freed_memory_kept": True}}))
    report_long.main(str(tmp_path / "runs"), str(tmp_path / "out"))
    text = (tmp_path / "out" / "long_comparison.md").read_text()
    assert "| 20* |" in text and text.count("| 20* |") == 1  # only the tree's row: fpgm ran at another commit
    assert "| fpgm | 0.4 | 0 | 0.390 | 80.00 |" in text and text.count("| 20 |") == 2
    assert report_long.KEPT_NOTE in text
