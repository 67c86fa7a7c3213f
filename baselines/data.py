"""Data sets for the harness, decoded once into memory (uint8 NCHW tensors) so CPU epochs are fast.

Embedded default: scikit-learn's digits (8x8 grey, upsampled to 3x32x32). From ``../shared/data``:
the CIFAR-10 JPEG set, Tiny-ImageNet-100 at 32x32 and Imagenette-112 (ImageFolder trees inside
``.tar.gz`` archives, read straight from the archive). For users who have them: torchvision's
CIFAR-10/100 on-disk format (``cifar-10-batches-py`` / ``cifar-100-python``) and any ImageNet-style
ImageFolder. Decoded archives are cached as ``.npz`` next to nothing the user owns (a cache folder).
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ARCHIVES = {  # name -> (archive file, train split, test split, image size)
    "cifar10-jpeg": ("cifar10-jpeg.tar.gz", "train", "test", 32),
    "tiny-imagenet-100-32": ("tiny-imagenet-100-32.tar.gz", "train", "val", 32),
    "imagenette-112": ("imagenette-112.tar.gz", "train", "val", 112),
}
STATS = {  # per-channel mean/std used to normalise inputs
    "digits": ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
    "cifar10-jpeg": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # akamaster's checkpoints use these
    "cifar10": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar100": ((0.5070, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tiny-imagenet-100-32": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenette-112": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
DATASETS = ("digits", *ARCHIVES, "cifar10", "cifar100", "imagefolder", "modelnet40", "modelnet40-h5",
            "modelnet40-normal")


@dataclass
class Split:
    images: torch.Tensor  # uint8 (N, 3, H, W)
    labels: torch.Tensor  # int64 (N,)


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    classes: List[str]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW -> normalised float32."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float() / 255.0 - mean) / std


def cache_dir() -> Path:
    return Path(os.environ.get("SIGMAB_CACHE", Path.home() / ".cache" / "sigmab"))


def load_dataset(name: str, root: Optional[str] = None, limit: Optional[int] = None, seed: int = 0) -> Dataset:
    """Load ``name`` (one of ``DATASETS``); ``limit`` keeps a class-stratified random subset of each split."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {list(DATASETS)}")
    if name.startswith("modelnet40"):
        from .points import load_points
        ds = load_points(name, root)
    elif name == "digits":
        ds = _digits()
    elif name in ARCHIVES:
        ds = _archive(name, Path(root) if root else SHARED_DATA)
    elif name in ("cifar10", "cifar100"):
        if root is None:
            raise ValueError(f"data set {name!r} needs root=<folder holding torchvision's "
                             f"{'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'}>")
        ds = _torchvision_cifar(name, Path(root))
    else:
        if root is None:
            raise ValueError("data set 'imagefolder' needs root=<folder with train/<class>/*.jpg and val/<class>/*.jpg>")
        ds = _imagefolder(Path(root))
    if limit is not None:
        ds.train, ds.test = _subset(ds.train, limit, seed), _subset(ds.test, limit, seed + 1)
    return ds


def _subset(split: Split, limit: int, seed: int) -> Split:
    if limit >= len(split.labels):
        return split
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(split.labels), generator=g)[:limit].sort().values
    return Split(split.images[idx], split.labels[idx])


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N,1,8,8) in [0,1]
    x = torch.nn.functional.interpolate(x, size=32, mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    n_test = len(y) // 5
    test, train = perm[:n_test].sort().values, perm[n_test:].sort().values
    return Dataset("digits", Split(x[train], y[train]), Split(x[test], y[test]), [str(i) for i in range(10)],
                   *STATS["digits"])


def _decode(data: bytes, size: Optional[int]) -> np.ndarray:
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def _archive(name: str, folder: Path) -> Dataset:
    file, train_dir, test_dir, size = ARCHIVES[name]
    path = folder / file if folder.is_dir() else folder
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: data set {name!r} expects the archive {file} "
                                f"(an ImageFolder tree {name}/{{{train_dir},{test_dir}}}/<class>/*.jpg)")
    cached = cache_dir() / f"{name}-{path.stat().st_size}.npz"  # a different archive gets its own cache
    if not cached.is_file():
        arrays = _read_archive(path, name, train_dir, test_dir, size)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, cached)
    with np.load(cached) as z:
        classes = [str(c) for c in z["classes"]]
        return Dataset(name, Split(torch.from_numpy(z["train_x"]), torch.from_numpy(z["train_y"])),
                       Split(torch.from_numpy(z["test_x"]), torch.from_numpy(z["test_y"])), classes, *STATS[name])


def _read_archive(path: Path, name: str, train_dir: str, test_dir: str, size: int) -> dict:
    items = {train_dir: [], test_dir: []}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                parts = member.name.split("/")
                if not member.isfile() or len(parts) != 4 or parts[1] not in items:
                    continue
                items[parts[1]].append((parts[2], parts[3], _decode(tar.extractfile(member).read(), size)))
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"{path} is not a readable .tar.gz archive ({err})") from err
    if not items[train_dir] or not items[test_dir]:
        raise ValueError(f"{path} holds no {name}/{{{train_dir},{test_dir}}}/<class>/<image> files: "
                         "expected an ImageFolder tree inside the archive")
    classes = sorted({c for c, _, _ in items[train_dir]})
    index = {c: i for i, c in enumerate(classes)}
    out = {"classes": np.array(classes)}
    for split, key in ((train_dir, "train"), (test_dir, "test")):
        rows = sorted(items[split], key=lambda r: (r[0], r[1]))
        out[f"{key}_x"] = np.stack([r[2] for r in rows])
        out[f"{key}_y"] = np.array([index[r[0]] for r in rows], dtype=np.int64)
    return out


def _torchvision_cifar(name: str, root: Path) -> Dataset:
    sub, train_files, test_files, label_key, meta = (
        ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels", ("batches.meta", "label_names"))
        if name == "cifar10" else
        ("cifar-100-python", ["train"], ["test"], "fine_labels", ("meta", "fine_label_names")))
    folder = root / sub if (root / sub).is_dir() else root
    def read(files):
        xs, ys = [], []
        for f in files:
            p = folder / f
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found: {name} expects torchvision's layout {sub}/{files}")
            with open(p, "rb") as fh:
                d = pickle.load(fh, encoding="latin1")  # the format itself is a pickle
            if "data" not in d or label_key not in d:
                raise ValueError(f"{p} is not a CIFAR batch (keys {sorted(d)[:5]}); expected 'data' and '{label_key}'")
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[label_key], dtype=np.int64))
        return Split(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)))
    train, test = read(train_files), read(test_files)
    if not (folder / meta[0]).is_file():
        raise FileNotFoundError(f"{folder / meta[0]} not found: {name} expects torchvision's layout {sub}/{meta[0]}")
    with open(folder / meta[0], "rb") as fh:
        classes = list(pickle.load(fh, encoding="latin1")[meta[1]])
    return Dataset(name, train, test, classes, *STATS[name])


def _imagefolder(root: Path) -> Dataset:
    splits = {}
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir():
            raise FileNotFoundError(f"{d} not found: 'imagefolder' expects {root}/train/<class>/*.jpg and "
                                    f"{root}/val/<class>/*.jpg")
        splits[split] = sorted((c.name, f) for c in d.iterdir() if c.is_dir() for f in sorted(c.iterdir()))
    classes = sorted({c for c, _ in splits["train"]})
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for split in ("train", "val"):
        x = np.stack([_decode(f.read_bytes(), 224) for _, f in splits[split]])
        y = np.array([index[c] for c, _ in splits[split]], dtype=np.int64)
        out.append(Split(torch.from_numpy(x), torch.from_numpy(y)))
    return Dataset("imagefolder", out[0], out[1], classes, *STATS["imagefolder"])
