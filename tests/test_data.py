"""Data loading: digits, torchvision's CIFAR format, ImageFolder, the shared archives, and errors."""
from __future__ import annotations

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from sigmab_plugin.baselines import data as D


def test_digits_is_embedded_and_split():
    ds = D.load_dataset("digits")
    assert ds.train.images.shape[1:] == (3, 32, 32) and ds.train.images.dtype == torch.uint8
    assert len(ds.train.labels) + len(ds.test.labels) == 1797 and ds.num_classes == 10
    x = ds.normalize(ds.test.images[:4])
    assert x.dtype == torch.float32 and torch.isfinite(x).all()


def _write_cifar(root, name):
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir()
        for f in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            with open(folder / f, "wb") as fh:
                pickle.dump({"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 9]}, fh)
        with open(folder / "batches.meta", "wb") as fh:
            pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, fh)
    else:
        folder = root / "cifar-100-python"
        folder.mkdir()
        for f in ("train", "test"):
            with open(folder / f, "wb") as fh:
                pickle.dump({"data": rng.integers(0, 255, (3, 3072), dtype=np.uint8), "fine_labels": [5, 99, 0]}, fh)
        with open(folder / "meta", "wb") as fh:
            pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, fh)


@pytest.mark.parametrize("name,n_train,classes", [("cifar10", 20, 10), ("cifar100", 3, 100)])
def test_torchvision_cifar_format(tmp_path, name, n_train, classes):
    _write_cifar(tmp_path, name)
    ds = D.load_dataset(name, str(tmp_path))
    assert ds.train.images.shape == (n_train, 3, 32, 32) and ds.num_classes == classes
    assert int(ds.train.labels.max()) < classes


def _jpeg(color):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, format="JPEG")
    return buf.getvalue()


def test_imagefolder(tmp_path):
    for split in ("train", "val"):
        for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            (tmp_path / split / cls).mkdir(parents=True)
            (tmp_path / split / cls / "a.jpg").write_bytes(_jpeg(color))
    ds = D.load_dataset("imagefolder", str(tmp_path))
    assert ds.classes == ["cat", "dog"] and ds.train.images.shape == (2, 3, 224, 224)
    assert ds.train.images[0, 0].float().mean() > ds.train.images[0, 2].float().mean()  # red cat


def test_archive_is_read_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGMAB_CACHE", str(tmp_path / "cache"))
    arch = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(arch, "w:gz") as tar:
        for split in ("train", "test"):
            for cls in ("airplane", "bird"):
                data = _jpeg((10, 200, 10))
                info = tarfile.TarInfo(f"cifar10-jpeg/{split}/{cls}/0000.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    ds = D.load_dataset("cifar10-jpeg", str(tmp_path))
    assert ds.classes == ["airplane", "bird"] and ds.train.images.shape == (2, 3, 32, 32)
    assert len(list((tmp_path / "cache").glob("cifar10-jpeg-*.npz"))) == 1


@pytest.mark.parametrize("name,root,message", [
    ("cifar10", "missing", "data_batch_1"),
    ("imagefolder", "missing", "expects"),
    ("cifar100", None, "needs root="),
    ("svhn", None, "unknown data set 'svhn'"),
])
def test_missing_or_unknown_data(tmp_path, name, root, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        D.load_dataset(name, None if root is None else str(tmp_path / root))


def test_malformed_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("SIGMAB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "imagenette-112.tar.gz").write_bytes(b"not a tar")
    with pytest.raises(ValueError, match="not a readable .tar.gz"):
        D.load_dataset("imagenette-112", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ImageFolder tree"):
        D.load_dataset("tiny-imagenet-100-32", str(tmp_path / "nowhere"))


def test_shared_archives_when_present():
    if not (D.SHARED_DATA / "cifar10-jpeg.tar.gz").is_file():
        pytest.skip("../shared/data is not present")
    ds = D.load_dataset("cifar10-jpeg", limit=50)
    assert len(ds.train.labels) == 50 and ds.num_classes == 10
