"""Point-cloud data for the harness: ModelNet40 in the shared ``.npz``, and for users the standard layouts
(``modelnet40_ply_hdf5_2048`` HDF5 files; ``modelnet40_normal_resampled`` text files), plus the usual
PointNet++ training augmentation (anisotropic scaling, translation, jitter, point dropout).

Clouds are held as float16 ``(N, 3, points)`` (coordinates first, the layout PointNet++ takes) and
cast to float32 per batch; every cloud is centred and scaled to the unit sphere.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from .data import Dataset, Split

SHARED_NPZ = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "modelnet40-1024.npz"
POINT_SETS = ("modelnet40", "modelnet40-h5", "modelnet40-normal")


def unit_sphere(points: np.ndarray) -> np.ndarray:
    """(N, P, 3) clouds centred and scaled so the farthest point is at distance 1."""
    centred = points - points.mean(1, keepdims=True)
    scale = np.linalg.norm(centred, axis=2).max(1).reshape(-1, 1, 1)
    return centred / np.maximum(scale, 1e-12)


@dataclass
class PointDataset(Dataset):
    """A ``Dataset`` of clouds: ``normalize`` casts to float32; ``augment`` is the training augmentation."""

    scale: tuple = (2 / 3, 1.5)
    shift: float = 0.2
    jitter: float = 0.01
    max_dropout: float = 0.875

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return images.float()

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random anisotropic scale, translation, clipped jitter and point dropout (dropped points become
        copies of the first), drawn from ``gen``; ``x`` is (B, 3, P)."""
        x = x.float()
        b, _, p = x.shape
        lo, hi = self.scale
        scale = lo + (hi - lo) * torch.rand(b, 3, 1, generator=gen)
        shift = (2 * torch.rand(b, 3, 1, generator=gen) - 1) * self.shift
        noise = (torch.randn(b, 3, p, generator=gen) * self.jitter).clamp(-5 * self.jitter, 5 * self.jitter)
        x = x * scale + shift + noise
        return drop_points(x, torch.rand(b, 1, generator=gen) * self.max_dropout, gen)


def drop_points(x: torch.Tensor, ratio, gen: torch.Generator) -> torch.Tensor:
    """Point dropout: each point of each cloud in ``x`` (B, 3, P) is dropped with probability ``ratio`` (a number,
    or one per cloud as (B, 1)) and becomes a copy of the cloud's first point, so the shape stays (B, 3, P)."""
    drop = torch.rand(x.shape[0], x.shape[2], generator=gen) <= ratio
    return torch.where(drop.unsqueeze(1), x[:, :, :1].expand_as(x), x)


def _split(points: np.ndarray, labels: np.ndarray, n_points: int, where: str) -> Split:
    if points.ndim != 3 or points.shape[2] < 3:
        raise ValueError(f"{where}: expected clouds of shape (N, points, 3+), got {points.shape}")
    if points.shape[1] < n_points:
        raise ValueError(f"{where}: clouds have {points.shape[1]} points, fewer than the {n_points} asked for")
    if len(points) != len(labels):
        raise ValueError(f"{where}: {len(points)} clouds but {len(labels)} labels")
    pts = points[:, :n_points, :3].astype(np.float32)
    if not np.isfinite(pts).all():
        raise ValueError(f"{where}: the clouds contain NaN or inf")
    pts = unit_sphere(pts).transpose(0, 2, 1)
    return Split(torch.from_numpy(np.ascontiguousarray(pts)).to(torch.float16), torch.from_numpy(labels.astype(np.int64)))


def load_points(name: str, root: Optional[str], n_points: int = 1024) -> PointDataset:
    if name == "modelnet40":
        return _npz(Path(root) / "modelnet40-1024.npz" if root else SHARED_NPZ, n_points)
    if root is None:
        raise ValueError(f"data set {name!r} needs root=<folder of the "
                         f"{'modelnet40_ply_hdf5_2048' if name == 'modelnet40-h5' else 'modelnet40_normal_resampled'} files>")
    return _h5(Path(root), n_points) if name == "modelnet40-h5" else _normal(Path(root), n_points)


def _npz(path: Path, n_points: int) -> PointDataset:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: 'modelnet40' expects the npz with train_points/train_labels/"
                                "test_points/test_labels/classes (see ../shared/data/README.md)")
    with np.load(path) as z:
        missing = [k for k in ("train_points", "train_labels", "test_points", "test_labels", "classes") if k not in z]
        if missing:
            raise ValueError(f"{path} misses the arrays {missing}")
        train = _split(z["train_points"], z["train_labels"], n_points, f"{path} (train)")
        test = _split(z["test_points"], z["test_labels"], n_points, f"{path} (test)")
        classes = [str(c) for c in z["classes"]]
    return PointDataset("modelnet40", train, test, classes, (0.0,), (1.0,))


def _h5(root: Path, n_points: int) -> PointDataset:
    try:
        import h5py
    except ImportError as err:
        raise ImportError("reading modelnet40_ply_hdf5_2048 needs h5py: pip install 'sigmab-plugin[points]'") from err
    folder = root / "modelnet40_ply_hdf5_2048" if (root / "modelnet40_ply_hdf5_2048").is_dir() else root
    splits = {}
    for split in ("train", "test"):
        files = sorted(folder.glob(f"ply_data_{split}*.h5"))
        if not files:
            raise FileNotFoundError(f"no ply_data_{split}*.h5 in {folder}: 'modelnet40-h5' expects the "
                                    "modelnet40_ply_hdf5_2048 files")
        data, labels = [], []
        for f in files:
            try:
                with h5py.File(f, "r") as h:
                    if "data" not in h or "label" not in h:
                        raise ValueError(f"{f} has no 'data'/'label' datasets (keys {list(h)})")
                    data.append(np.asarray(h["data"]))
                    labels.append(np.asarray(h["label"]).reshape(-1))
            except OSError as err:
                raise ValueError(f"{f} is not a readable HDF5 file ({err})") from err
        splits[split] = _split(np.concatenate(data), np.concatenate(labels), n_points, str(folder))
    names = folder / "shape_names.txt"
    classes = names.read_text().split() if names.is_file() else [str(i) for i in range(40)]
    return PointDataset("modelnet40-h5", splits["train"], splits["test"], classes, (0.0,), (1.0,))


def _normal(root: Path, n_points: int) -> PointDataset:
    folder = root / "modelnet40_normal_resampled" if (root / "modelnet40_normal_resampled").is_dir() else root
    names = folder / "modelnet40_shape_names.txt"
    if not names.is_file():
        raise FileNotFoundError(f"{names} not found: 'modelnet40-normal' expects modelnet40_normal_resampled")
    classes: List[str] = names.read_text().split()
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in ("train", "test"):
        listing = folder / f"modelnet40_{split}.txt"
        if not listing.is_file():
            raise FileNotFoundError(f"{listing} not found")
        clouds, labels = [], []
        for shape in listing.read_text().split():
            cls = shape.rpartition("_")[0]
            if cls not in index:
                raise ValueError(f"{listing}: shape {shape!r} names no class of {names.name}")
            f = folder / cls / f"{shape}.txt"
            try:
                arr = np.loadtxt(f, delimiter=",", dtype=np.float32, max_rows=n_points, ndmin=2)
            except (OSError, ValueError) as err:
                raise ValueError(f"{f} is not a comma-separated x,y,z[,nx,ny,nz] point file ({err})") from err
            if arr.shape[1] < 3:
                raise ValueError(f"{f}: rows have {arr.shape[1]} values, expected x,y,z[,nx,ny,nz]")
            if len(arr) < n_points:
                raise ValueError(f"{f}: {len(arr)} points, fewer than the {n_points} asked for")
            clouds.append(arr[:, :3])
            labels.append(index[cls])
        splits[split] = _split(np.stack(clouds), np.array(labels), n_points, str(listing))
    return PointDataset("modelnet40-normal", splits["train"], splits["test"], classes, (0.0,), (1.0,))
