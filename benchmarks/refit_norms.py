"""How much ``sb.reconstruct`` grows the weights of a statically pruned model (the diagnostic behind
benchmarks/results/ablate_recon.md, "Hypothesis 1"): per layer, the weight norm before and after the
refit and the cosine between the two.

    python -m benchmarks.refit_norms [--model resnet20] [--fraction 0.3] [--ridge 0.01]
"""
from __future__ import annotations

import argparse

import torch

import sigmab_plugin as sb
from sigmab_plugin.baselines import fpgm  # noqa: F401  (registers the method)
from sigmab_plugin.baselines.data import load_dataset
from sigmab_plugin.baselines.models import classifier_name, create_model
from sigmab_plugin.baselines.registry import RunContext, get_method


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--checkpoint", default="../shared/weights/resnet20-12fca82f.th")
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--ridge", type=float, default=1e-2)
    ap.add_argument("--calib-size", type=int, default=512)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    data = load_dataset("cifar10-jpeg", None, seed=0)
    dense = create_model(a.model, 10, a.checkpoint, "A").eval()
    g = torch.Generator().manual_seed(1)  # the harness's calibration subset for seed 0
    calib = data.normalize(data.train.images[torch.randperm(len(data.train.labels), generator=g)[:a.calib_size]])
    n = sum(p.numel() for p in dense.parameters())
    model = get_method("fpgm").prepare(RunContext(dense, calib, int(a.fraction * n), {}, classifier_name(dense), 0,
                                                  a.fraction))
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("weight") and v.dim() > 1}
    sb.reconstruct(model, dense, calib, ridge=a.ridge)
    after = model.state_dict()
    print(f"FPGM {a.model} at {a.fraction} active, refit with ridge {a.ridge:g} on {len(calib)} images")
    for k, b in before.items():
        w = after[k]
        cos = torch.nn.functional.cosine_similarity(w.flatten(), b.flatten(), 0)
        print(f"{k:24s} norm {b.norm():7.3f} -> {w.norm():7.3f}  x{w.norm() / b.norm():4.2f}  cosine {cos:.3f}")


if __name__ == "__main__":
    main()
