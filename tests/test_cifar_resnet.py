"""The CIFAR ResNet adapter against the public checkpoints and the real CIFAR-10 (JPEG) test set."""
from __future__ import annotations

import pytest
import torch

import sigmab_plugin as sb
from sigmab_plugin.adapters.cifar_resnet import CifarResNet, cifar_resnet, load_checkpoint
from sigmab_plugin.finetune import FinetuneConfig, finetune

CHECKPOINTS = [(20, "resnet20-12fca82f.th"), (32, "resnet32-d509ac18.th"), (44, "resnet44-014dd654.th"),
               (56, "resnet56-4bfd9763.th")]


@pytest.fixture(scope="module")
def cifar_test():
    from sigmab_plugin.baselines.data import SHARED_DATA, load_dataset

    if not (SHARED_DATA / "cifar10-jpeg.tar.gz").is_file():
        pytest.skip("../shared/data/cifar10-jpeg.tar.gz is not present")
    ds = load_dataset("cifar10-jpeg", limit=1000)
    return ds.normalize(ds.test.images), ds.test.labels


@pytest.mark.parametrize("depth,file", CHECKPOINTS)
def test_option_a_checkpoints_score_as_documented(depth, file, shared_dir, cifar_test):
    model = cifar_resnet(depth, 10, "A", shared_dir / "weights" / file).eval()
    x, y = cifar_test
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    assert 0.76 < acc < 0.88, acc  # README: 81.0-83.2% on this JPEG test set


def test_option_b_cifar100_checkpoint_loads(shared_dir):
    model = cifar_resnet(56, 100, "B", shared_dir / "weights" / "cifar100_resnet56-f2eff4c8.pt").eval()
    assert model.layer2[0].downsample[0].weight.shape == (32, 16, 1, 1)
    out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 100) and torch.isfinite(out).all()


def test_wrong_checkpoint_is_refused(shared_dir):
    with pytest.raises(ValueError, match="does not fit CifarResNet-56"):
        cifar_resnet(56, 10, "A", shared_dir / "weights" / "resnet20-12fca82f.th")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(CifarResNet(20), shared_dir / "weights" / "missing.th")


def test_pretrained_tree_at_keep_one_keeps_accuracy(shared_dir, cifar_test):
    x, y = cifar_test
    model = cifar_resnet(20, 10, "A", shared_dir / "weights" / "resnet20-12fca82f.th").eval()
    with torch.no_grad():
        dense = model(x)
    sb.branch(model, depth=2, calib_data=x[:256], keep_ratio=1.0, progress=False)
    with torch.no_grad():
        tree = model(x)
    assert torch.allclose(tree, dense, atol=1e-4)
    assert torch.equal(tree.argmax(1), dense.argmax(1))


def test_bad_arguments():
    with pytest.raises(ValueError, match="depth 18"):
        CifarResNet(18)
    with pytest.raises(ValueError, match="shortcut='C'"):
        CifarResNet(20, shortcut="C")


def test_pad_shortcut_pruner_keeps_the_channel_map():
    """Pruning through the option-A shortcut equals masking the pruned channels of the dense block."""
    import torch_pruning as tp

    from sigmab_plugin.adapters.cifar_resnet import PadShortcut, PadShortcutPruner

    pad = PadShortcut(4, 8)
    x = torch.randn(2, 4, 6, 6)
    ref = pad(x)
    assert torch.equal(ref[:, 2:6], x[:, :, ::2, ::2]) and ref[:, [0, 1, 6, 7]].abs().sum() == 0
    pruner = PadShortcutPruner()
    pruner.prune_in_channels(pad, [1])  # input channel 1 removed: its output position becomes zero
    pruner.prune_out_channels(pad, [0, 3])  # output channels 0 and 3 removed
    keep_out = [1, 2, 4, 5, 6, 7]
    masked = ref.clone()
    masked[:, 3] = 0
    assert torch.equal(pad(x[:, [0, 2, 3]]), masked[:, keep_out])
    assert isinstance(pruner, tp.pruner.function.BasePruningFunc)


def test_training_checkpoint_reloads(tmp_path):
    """The checkpoint finetune() writes (the harness's pretraining step: weights under 'model') loads as
    --checkpoint of a later run, with the trained weights, not refused as a foreign state dict."""
    torch.manual_seed(0)
    model = CifarResNet(20, 10, "B")
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (16,))
    finetune(model, images, labels, lambda x: x.float() / 255,
             FinetuneConfig(epochs=1, batch_size=8, lr=0.05), out_dir=tmp_path)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert "model" in ck and "optimizer" in ck
    fresh = load_checkpoint(CifarResNet(20, 10, "B"), tmp_path / "checkpoint.pt").eval()
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(fresh(x), model.eval()(x))
    assert not torch.equal(fresh(x), CifarResNet(20, 10, "B").eval()(x))  # the trained weights, not an init
