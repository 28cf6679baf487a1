"""Datasets: CIFAR-10, Fashion-MNIST, their strided 1k subsets and the embedded `digits` set.

Every dataset is returned as float32 tensors N x C x H x W, standardized per pixel with the
statistics of its (full) training set, and int64 labels. Prepared tensors are cached under
`$DATASETS/prepared/` so that later loads are fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DataUnavailable, SharpnessError

CACHE_VERSION = "v1"

# name -> (source set, stride of the subset or None)
DATASETS: dict[str, tuple[str, int | None]] = {
    "digits": ("digits", None),
    "cifar10": ("cifar10", None),
    "cifar10_1k": ("cifar10", 50),
    "fashion_mnist": ("fashion_mnist", None),
    "fashion_mnist_1k": ("fashion_mnist", 60),
}

DIGITS_TRAIN = 1500  # digits: the first 1,500 images train, the remaining 297 test
DIGITS_SIZE = 32  # digits are resized (bilinear) from 8x8 to 32x32 so that VGG11 accepts them

_CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
_FASHION_FILES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


@dataclass
class Dataset:
    """A prepared dataset: standardized float32 images and int64 labels."""

    name: str
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example (C, H, W)."""
        return tuple(self.X_train.shape[1:])

    @property
    def num_classes(self) -> int:
        """Number of classes (largest label + 1 over train and test)."""
        return int(max(self.y_train.max().item(), self.y_test.max().item())) + 1

    def to(self, device: torch.device | str) -> "Dataset":
        """The same dataset with every tensor on `device`."""
        return Dataset(self.name, *(t.to(device) for t in
                                    (self.X_train, self.y_train, self.X_test, self.y_test)))


def datasets_dir() -> Path:
    """Where datasets live: `$DATASETS`, else a per-user cache directory."""
    env = os.environ.get("DATASETS")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "sharpness" / "datasets"


def check_dataset_name(name: str) -> None:
    """Raise a clear error when `name` is not a known dataset."""
    if name not in DATASETS:
        raise SharpnessError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")


def strided_indices(n: int, size: int, offset: int = 0) -> torch.Tensor:
    """Indices offset, offset+s, offset+2s, ... (size of them, s = n // size) into n examples."""
    if size <= 0:
        raise SharpnessError(f"subset size must be positive, got {size}")
    if size >= n:
        if offset != 0:
            raise SharpnessError(f"a subset of {size} from {n} examples is the whole set; "
                                 "offsets other than 0 are impossible")
        return torch.arange(n)
    stride = n // size
    if not 0 <= offset < stride:
        raise SharpnessError(f"subset offset {offset} out of range: {size} of {n} examples "
                             f"leaves room for offsets 0..{stride - 1}")
    return offset + stride * torch.arange(size)


def load_dataset(name: str, root: Path | None = None) -> Dataset:
    """Load a prepared dataset, preparing (and downloading) it first if needed."""
    check_dataset_name(name)
    root = Path(root) if root is not None else datasets_dir()
    cached = _cache_path(root, name)
    source, stride = DATASETS[name]
    raw = _raw_fingerprint(source, root)  # None when the raw files are gone: the cache is all there is
    if cached.exists():
        try:
            data = _read_cache(cached)
            if raw is None or data.get("raw") == raw:  # prepared from these very raw files
                return Dataset(name, **{k: data[k] for k in _TENSORS})
        except Exception:  # a damaged cache file is rebuilt, never trusted
            pass
    if stride is None:
        tensors = _prepare_source(source, root)
    else:
        full = load_dataset(source, root)
        tr = torch.arange(0, len(full.y_train), stride)  # 0, stride, 2*stride, ...
        te = torch.arange(0, len(full.y_test), stride)
        tensors = dict(X_train=full.X_train[tr].clone(), y_train=full.y_train[tr].clone(),
                       X_test=full.X_test[te].clone(), y_test=full.y_test[te].clone())
    _write_cache(cached, {**tensors, "raw": raw})
    return Dataset(name, **tensors)


def standardize(X_train: torch.Tensor, X_test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre and scale every pixel by the training set's mean and std (float32 results)."""
    X_train = X_train.to(torch.float64)
    mean = X_train.mean(0)
    std = X_train.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))  # constant pixels (digits' borders)
    return (((X_train - mean) / std).to(torch.float32),
            ((X_test.to(torch.float64) - mean) / std).to(torch.float32))


def is_prepared(name: str, root: Path | None = None) -> bool:
    """Whether `name` is cached under the datasets directory (loading it needs no raw files)."""
    return _cache_path(Path(root) if root is not None else datasets_dir(), name).exists()


def _cache_path(root: Path, name: str) -> Path:
    return root / "prepared" / CACHE_VERSION / f"{name}.pt"


_TENSORS = ("X_train", "y_train", "X_test", "y_test")


def _read_cache(path: Path) -> dict:
    data = torch.load(path, map_location="cpu", weights_only=True)
    return {k: data[k] for k in _TENSORS} | {"raw": data.get("raw")}


def _raw_files(source: str, root: Path) -> list[Path]:
    """The raw files a source is prepared from (none for digits, which ships with scikit-learn)."""
    if source == "cifar10":
        return [root / "cifar-10-batches-py" / f for f in _CIFAR_FILES]
    if source == "fashion_mnist":
        return [root / "FashionMNIST" / "raw" / f for f in _FASHION_FILES]
    return []


def _raw_fingerprint(source: str, root: Path) -> list | None:
    """Name, size and modification time of every raw file; None when any is missing."""
    out = []
    for f in _raw_files(source, root):
        try:
            st = f.stat()
        except OSError:
            return None
        out.append([f.name, st.st_size, st.st_mtime_ns])
    return out or None


def _write_cache(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from .results import atomic_torch_save

    try:
        atomic_torch_save(tensors, path)
    except (OSError, SharpnessError):
        pass  # an unwritable cache (a read-only $DATASETS) only costs time on the next load


def _prepare_source(source: str, root: Path) -> dict[str, torch.Tensor]:
    if source == "digits":
        X_train, y_train, X_test, y_test = _raw_digits()
    elif source == "cifar10":
        X_train, y_train, X_test, y_test = _raw_torchvision("cifar10", root)
    else:
        X_train, y_train, X_test, y_test = _raw_torchvision("fashion_mnist", root)
    X_train, X_test = standardize(X_train, X_test)
    return dict(X_train=X_train, y_train=y_train, X_test=X_test, y_test=y_test)


def _raw_digits() -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    X = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    X = torch.nn.functional.interpolate(X, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear",
                                        align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.int64)
    return X[:DIGITS_TRAIN], y[:DIGITS_TRAIN], X[DIGITS_TRAIN:], y[DIGITS_TRAIN:]


def _raw_torchvision(source: str, root: Path) -> tuple[torch.Tensor, ...]:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if source == "cifar10" else torchvision.datasets.FashionMNIST
    present = _raw_fingerprint(source, root) is not None
    try:
        train, test = cls(str(root), train=True), cls(str(root), train=False)
    except Exception as exc:  # missing, or failing torchvision's checksums or format checks
        if present:  # every file is there: damaged, and downloading would not replace it
            raise DataUnavailable(_missing_message(source, root, exc, damaged=True)) from None
        try:
            root.mkdir(parents=True, exist_ok=True)
            train = cls(str(root), train=True, download=True)
            test = cls(str(root), train=False, download=True)
        except Exception as exc:  # offline, proxy, disk: all end in the same advice
            raise DataUnavailable(_missing_message(source, root, exc)) from None
    shape = (32, 32, 3) if source == "cifar10" else (28, 28)
    tensors = []
    for split in (train, test):
        data = torch.as_tensor(split.data)
        labels = torch.as_tensor(split.targets, dtype=torch.int64)
        problem = (f"{len(data)} images but {len(labels)} labels" if len(data) != len(labels) else
                   f"images of shape {tuple(data.shape[1:])}, not {shape}" if tuple(data.shape[1:]) != shape else
                   "labels outside 0..9" if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) <= 9
                   else None)
        if problem:
            raise DataUnavailable(_missing_message(source, root, ValueError(problem), damaged=True))
        X = data.permute(0, 3, 1, 2).contiguous() if source == "cifar10" else data.unsqueeze(1)
        tensors += [X.to(torch.float32) / 255.0, labels]  # CIFAR: N x 32 x 32 x 3 -> N x 3 x 32 x 32
    return tensors[0], tensors[1], tensors[2], tensors[3]


def _missing_message(source: str, root: Path, exc: Exception, damaged: bool = False) -> str:
    reason = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:200]
    if source == "cifar10":
        where = root / "cifar-10-batches-py"
        files = ", ".join(_CIFAR_FILES)
        origin = ("the python version of CIFAR-10 "
                  "(https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extract it there)")
    else:
        where = root / "FashionMNIST" / "raw"
        files = ", ".join(_FASHION_FILES)
        origin = ("the four Fashion-MNIST idx files, uncompressed "
                  "(http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/)")
    what = (f"its files under {where} are damaged ({reason})" if damaged else
            f"its files are missing or damaged under {where} and the download failed ({reason})")
    return (f"{source} is not available: {what}. Place {origin} so that these files exist in {where}: "
            f"{files}. Or set DATASETS to a directory that already holds them "
            f"(now: {root}). Then run the command again.")
