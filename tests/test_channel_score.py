"""BranchConfig.channel_score: how each node ranks its channels. 'activation_weight' multiplies a consumer's
mean |input| by the L2 norm of the weights that input feeds, so it does not change when a channel is scaled
down before a ReLU and scaled back up where it is read (the network computes the same function); the plain
activation score does, and drops that channel."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sigmab_plugin as sb
from sigmab_plugin._split import column_norms
from sigmab_plugin.branch import plan_tree
from sigmab_plugin.config import BranchConfig
from conftest import images


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.a(torch.relu(self.stem(x))))
        x = torch.relu(self.c(torch.relu(self.b(x))))
        return self.fc(x.mean((2, 3)))


def _plan(model, score):
    tree = sb.branch(copy.deepcopy(model), depth=2, split_points=["stem", "a"], keep_ratio=0.5, channel_score=score,
                     calib_data=images(64, seed=3), progress=False)
    return tree._sigmab_tree.spec["plan"]


def _rescaled(model, channel, s=1e-3):
    """The same function: channel ``channel`` of b scaled by s (ReLU commutes with s > 0), c's column by 1/s."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.b.weight[channel] *= s
        out.b.bias[channel] *= s
        out.c.weight[:, channel] /= s
    x = images(8, seed=9)
    torch.testing.assert_close(out(x), model(x), rtol=1e-4, atol=1e-5)
    return out


def test_activation_weight_ranking_ignores_a_rescale_that_activation_alone_does_not():
    torch.manual_seed(0)
    model = Net().eval()
    base = _plan(model, "activation")
    channel = base["2/0"]["b"][0]  # kept by the first leaf on the original weights
    rescaled = _rescaled(model, channel)
    assert all(channel not in p["b"] for k, p in _plan(rescaled, "activation").items() if k.startswith("2/"))
    assert _plan(rescaled, "activation_weight") == _plan(model, "activation_weight")
    # c's weights do not change what c reads, so only the weight-aware choice of b's channels follows them
    reweighted = copy.deepcopy(model)
    with torch.no_grad():
        reweighted.c.weight.mul_(torch.linspace(0.1, 3.0, 16).view(1, 16, 1, 1))
    assert _plan(reweighted, "activation")["2/0"]["b"] == base["2/0"]["b"]
    assert _plan(reweighted, "activation_weight")["2/0"]["b"] != _plan(model, "activation_weight")["2/0"]["b"]


def test_activation_weight_keeps_the_channels_with_the_largest_product():
    torch.manual_seed(1)
    model = Net().eval()
    with torch.no_grad():  # columns of very different norms, so the product and |activation| disagree
        model.c.weight.mul_(torch.linspace(0.1, 3.0, 16).view(1, 16, 1, 1))
    calib = images(64, seed=3)
    cfg = sb.BranchConfig(depth=2, split_points=["stem", "a"], keep_ratio=0.5, channel_score="activation_weight",
                          progress=False)
    spec, _, pass1 = plan_tree(model, cfg, calib, calib[:2], torch.device("cpu"))
    seen = []
    h = model.c.register_forward_pre_hook(lambda m, i: seen.append(i[0].abs().mean((2, 3))))
    with torch.no_grad():
        model(calib)
    h.remove()
    norms = model.c.weight.detach().double().pow(2).sum((0, 2, 3)).sqrt()
    for leaf in range(4):  # an independent score: the leaf's calibration samples' mean |input of c| x column norms
        act = seen[0][pass1.paths[2] == leaf].mean(0).double()
        kept = spec["plan"][f"2/{leaf}"]["b"]
        assert kept == sorted(torch.topk(act * norms, len(kept)).indices.tolist()), leaf
        assert kept != sorted(torch.topk(act, len(kept)).indices.tolist()), leaf


@pytest.mark.parametrize("layer", [nn.Conv2d(6, 4, 3), nn.Conv2d(6, 4, 3, groups=2), nn.Conv1d(6, 4, 1),
                                   nn.Linear(6, 4)])
def test_column_norms_are_the_norms_of_each_input_channels_weights(layer):
    torch.manual_seed(0)
    w = layer.weight.detach().double()
    x = torch.zeros(6)
    expected = []
    for c in range(6):  # the weights that input c feeds: what changes in the output when input c changes
        x.zero_()
        x[c] = 1
        if isinstance(layer, nn.Linear):
            expected.append(w[:, c].norm())
        else:
            g = getattr(layer, "groups", 1)
            per = 6 // g
            rows = w[(c // per) * (w.shape[0] // g):(c // per + 1) * (w.shape[0] // g), c % per]
            expected.append(rows.norm())
    torch.testing.assert_close(column_norms(layer), torch.stack(expected))


def test_unknown_channel_score_is_refused():
    with pytest.raises(ValueError, match="channel_score='wanda' is not one of"):
        sb.BranchConfig(channel_score="wanda")


def test_activation_importance_score_reaches_static_pruners_and_sigmab_pruner():
    import torch_pruning as tp
    from sigmab_plugin.torch_pruning import ActivationImportance, SigmaBPruner

    torch.manual_seed(1)
    model = Net().eval()
    with torch.no_grad():
        model.c.weight.mul_(torch.linspace(0.1, 3.0, 16).view(1, 16, 1, 1))
    calib = images(64, seed=3)

    def score(kind):  # b's output channels as one static pruner would rank them
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=calib[:2])
        g = dg.get_pruning_group(model.b, tp.prune_conv_out_channels, list(range(16)))
        return ActivationImportance(model, calib, score=kind)(g)
    seen = []
    h = model.c.register_forward_pre_hook(lambda m, i: seen.append(i[0].abs().mean((2, 3)).mean(0).double()))
    with torch.no_grad():
        model(calib)
    h.remove()
    product = seen[0] * model.c.weight.detach().double().pow(2).sum((0, 2, 3)).sqrt()
    torch.testing.assert_close(score("activation_weight").double(), product / product.mean())
    torch.testing.assert_close(score("activation").double(), seen[0] / seen[0].mean())

    pruned = SigmaBPruner(copy.deepcopy(model), calib[:2], ActivationImportance(model, calib, score="activation_weight"),
                          calib_data=calib, split_points=["stem", "a"], progress=False)
    assert pruned.config.channel_score == "activation_weight"
    with pytest.raises(ValueError, match="contradicts importance's score='activation_weight'"):
        SigmaBPruner(copy.deepcopy(model), calib[:2], ActivationImportance(model, calib, score="activation_weight"),
                     calib_data=calib, split_points=["stem", "a"], channel_score="activation", progress=False)
    # a config that leaves channel_score at its default does not contradict an importance with another score
    other = "activation" if BranchConfig.channel_score != "activation" else "activation_weight"
    pruned = SigmaBPruner(copy.deepcopy(model), calib[:2], ActivationImportance(model, calib, score=other),
                          calib_data=calib, config=BranchConfig(split_points=["stem", "a"], progress=False))
    assert pruned.config.channel_score == other
    # a config that states a non-default score does
    with pytest.raises(ValueError, match=f"channel_score={other!r} contradicts"):
        SigmaBPruner(copy.deepcopy(model), calib[:2], ActivationImportance(model, calib,
                                                                           score=BranchConfig.channel_score),
                     calib_data=calib, config=BranchConfig(split_points=["stem", "a"], progress=False,
                                                           channel_score=other))
    with pytest.raises(ValueError, match="score='wanda' is not one of"):
        ActivationImportance(model, calib, score="wanda")
