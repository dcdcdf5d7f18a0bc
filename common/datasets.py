"""The built-in datasets by name (Fashion-MNIST, MNIST, CIFAR, digits, synthetic), each
normalised to float32 (N, C, H, W) with int64 labels, loaded once per process and
memory-mapped from a disk cache. Nothing here is ever put in a message.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

from common.models import TaskSpec
from common.options import DATASET_NAMES
from common.partition import train_test_split

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_DATA_ROOT = Path.home() / ".cache" / "fedmutual" / "data"
CACHE_DIR = Path(os.environ.get("FEDMUTUAL_CACHE", Path.home() / ".cache" / "fedmutual"))


class DataError(ValueError):
    """A dataset cannot be found or its files are not what they should be."""


@dataclass(frozen=True)
class ArrayDataset:
    """A whole dataset in memory: normalised float32 images and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    spec: TaskSpec


# --------------------------------------------------------------------------- IDX (MNIST-like)
_IDX_FILES = {
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped): unsigned-byte images or labels."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != header + int(np.prod(dims)):
        raise DataError(f"{path}: expected {int(np.prod(dims))} bytes of data for shape "
                        f"{dims}, found {len(raw) - header} (truncated?)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx_dir(candidates: list[Path]) -> Path | None:
    for d in candidates:
        if all((d / n).exists() or (d / f"{n}.gz").exists() for n in _IDX_FILES.values()):
            return d
    return None


def _read_idx_dir(d: Path) -> dict[str, np.ndarray]:
    out = {}
    for key, name in _IDX_FILES.items():
        out[key] = read_idx(d / name if (d / name).exists() else d / f"{name}.gz")
    return out


def _load_mnist_like(name: str, data_dir: str) -> dict[str, np.ndarray]:
    tv_name = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}[name]
    root = Path(data_dir).expanduser().resolve() if data_dir else DEFAULT_DATA_ROOT
    candidates = [root, root / tv_name / "raw"]
    if name == "fashion-mnist":
        candidates.append(DEBIAN_FASHION_MNIST)
    found = _find_idx_dir(candidates)
    if found is None:
        try:  # only where there is internet: torchvision fetches into <root>/<Name>/raw
            import torchvision.datasets as tvd

            getattr(tvd, tv_name)(str(root), train=True, download=True)
            getattr(tvd, tv_name)(str(root), train=False, download=True)
            found = _find_idx_dir([root / tv_name / "raw"])
        except Exception as exc:  # noqa: BLE001 - any download failure means "not available"
            hint = (" or install Debian's package: apt-get install dataset-fashion-mnist"
                    if name == "fashion-mnist" else "")
            raise DataError(
                f"dataset '{name}' not found: looked for IDX files in "
                f"{', '.join(map(str, candidates))}, and the download failed ({exc}). "
                f"Put the four IDX files in the folder named by run-config key 'data-dir'"
                f"{hint}."
            ) from None
    arrays = _read_idx_dir(found)
    for split in ("train", "test"):
        if len(arrays[f"x_{split}"]) != len(arrays[f"y_{split}"]):
            raise DataError(f"{found}: {split} images and labels differ in count")
    return arrays


def _load_cifar(name: str, data_dir: str) -> dict[str, np.ndarray]:
    import torchvision.datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    root = str(Path(data_dir).expanduser().resolve() if data_dir else DEFAULT_DATA_ROOT)
    out = {}
    for split, train in (("train", True), ("test", False)):
        try:  # torchvision checks every file's MD5 before it unpickles it
            ds = cls(root, train=train, download=False)
        except RuntimeError:
            try:
                ds = cls(root, train=train, download=True)
            except Exception as exc:  # noqa: BLE001
                raise DataError(
                    f"dataset '{name}' not found or corrupt under {root} (torchvision "
                    f"layout, files checked by MD5), and the download failed ({exc}). Set "
                    f"run-config key 'data-dir' to the folder holding "
                    f"'{cls.base_folder}'."
                ) from None
        out[f"x_{split}"] = ds.data.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        out[f"y_{split}"] = np.asarray(ds.targets)
    return out


def _load_digits() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    train, test = _fixed_split(len(x), 0.2)
    return {"x_train": x[train], "y_train": d.target[train],
            "x_test": x[test], "y_test": d.target[test]}


def _load_synthetic(n_train: int = 20000, n_test: int = 2000, classes: int = 10,
                    size: int = 8) -> dict[str, np.ndarray]:
    """Fixed (seed-independent) Gaussian class prototypes plus noise: learnable, tiny."""
    rng = np.random.default_rng(20240101)
    protos = rng.normal(0, 1, (classes, 1, size, size)).astype(np.float32)
    y = rng.integers(0, classes, n_train + n_test)
    x = protos[y] + rng.normal(0, 1.0, (len(y), 1, size, size)).astype(np.float32)
    return {"x_train": x[:n_train], "y_train": y[:n_train],
            "x_test": x[n_train:], "y_test": y[n_train:]}


def _fixed_split(n: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    return train_test_split(n, test_fraction, seed=0)


def normalise(arrays: dict[str, np.ndarray],
               stats: tuple[Sequence[float], Sequence[float]] | None = None) -> ArrayDataset:
    """uint8 -> [0, 1], then standardise per channel: with ``stats`` (mean, std) where
    given, else with the train set's own statistics (right for a built-in dataset, whose
    train set is the same on every node; never for a node's own file)."""
    x_train = arrays["x_train"]
    if x_train.ndim == 3:
        arrays = {k: (v[:, None] if k.startswith("x_") else v) for k, v in arrays.items()}
    scale = 255.0 if arrays["x_train"].dtype == np.uint8 else 1.0
    xs = {k: arrays[k].astype(np.float32) / scale for k in ("x_train", "x_test") if k in arrays}
    if stats is not None:
        mean = np.asarray(stats[0], np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(stats[1], np.float32).reshape(1, -1, 1, 1)
    else:
        mean = xs["x_train"].mean(axis=(0, 2, 3), keepdims=True)
        std = xs["x_train"].std(axis=(0, 2, 3), keepdims=True) + 1e-6
    xs = {k: np.ascontiguousarray((v - mean) / std) for k, v in xs.items()}
    y_train = np.asarray(arrays["y_train"], dtype=np.int64)
    y_test = np.asarray(arrays["y_test"], dtype=np.int64) if "y_test" in arrays else None
    n, c, h, w = xs["x_train"].shape
    labels = y_train if y_test is None else np.concatenate([y_train, y_test])
    spec = TaskSpec(channels=c, size=h, num_classes=int(labels.max()) + 1)
    return ArrayDataset(xs["x_train"], y_train, xs.get("x_test"), y_test, spec)


_CACHE_FORMAT = 1


def _source_fingerprint(name: str, data_dir: str) -> str:
    """What the cached arrays were made from: the files' names, sizes and times."""
    parts = [name, data_dir, str(_CACHE_FORMAT)]
    roots = [Path(data_dir).expanduser() if data_dir else DEFAULT_DATA_ROOT]
    if name == "fashion-mnist":
        roots.append(DEBIAN_FASHION_MNIST)
    if name == "digits":
        parts.append(version("scikit-learn"))
    for root in roots:
        if root.is_dir():
            for f in sorted(root.rglob("*")):
                if f.is_file():
                    st = f.stat()
                    parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _read_cached(folder: Path) -> ArrayDataset | None:
    try:
        meta = json.loads((folder / "spec.json").read_text())
        arrays = {k: np.load(folder / f"{k}.npy", mmap_mode="r", allow_pickle=False)
                  for k in meta["arrays"]}
    except (OSError, ValueError, KeyError):
        return None
    return ArrayDataset(arrays["x_train"], arrays["y_train"], arrays.get("x_test"),
                        arrays.get("y_test"), TaskSpec(**meta["spec"]))


def _write_cached(folder: Path, ds: ArrayDataset) -> None:
    arrays = {k: getattr(ds, k) for k in ("x_train", "y_train", "x_test", "y_test")
              if getattr(ds, k) is not None}
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        for k, v in arrays.items():
            np.save(tmp / f"{k}.npy", v, allow_pickle=False)
        spec = {"channels": ds.spec.channels, "size": ds.spec.size,
                "num_classes": ds.spec.num_classes}
        (tmp / "spec.json").write_text(json.dumps({"arrays": list(arrays), "spec": spec}))
        os.replace(tmp, folder)
    except OSError:  # read-only or racing writer: the cache only saves time
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


# name -> raw arrays (x_train, y_train, x_test, y_test) from data-dir; "npz" is each node's own
LOADERS: dict[str, Callable[[str], dict[str, np.ndarray]]] = {
    "fashion-mnist": functools.partial(_load_mnist_like, "fashion-mnist"),
    "mnist": functools.partial(_load_mnist_like, "mnist"),
    "cifar10": functools.partial(_load_cifar, "cifar10"),
    "cifar100": functools.partial(_load_cifar, "cifar100"),
    "digits": lambda data_dir: _load_digits(),
    "synthetic": lambda data_dir: _load_synthetic(),
}
if set(LOADERS) | {"npz"} != set(DATASET_NAMES):  # the config validates without torch
    raise ImportError(f"common.datasets loads {sorted(LOADERS)} (+ npz), but "
                      f"common.options.DATASET_NAMES lists {DATASET_NAMES}: keep them in step")


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, data_dir: str = "") -> ArrayDataset:
    """A built-in dataset, normalised; once per process, and memory-mapped from a disk cache.

    A deployed SuperNode starts a fresh process for every message, and each simulated
    client process would otherwise hold its own copy: the cache
    (``$FEDMUTUAL_CACHE/datasets``, default ``~/.cache/fedmutual``) makes a load cost
    milliseconds and lets processes share the pages.
    """
    if name not in DATASET_NAMES or name == "npz":
        raise DataError(f"unknown built-in dataset {name!r}: expected one of "
                        f"{', '.join(n for n in DATASET_NAMES if n != 'npz')}")
    folder = CACHE_DIR / "datasets" / f"{name}-{_source_fingerprint(name, data_dir)}"
    cached = _read_cached(folder)
    if cached is not None:
        return cached
    ds = normalise(LOADERS[name](data_dir))
    _write_cached(folder, ds)
    return ds


