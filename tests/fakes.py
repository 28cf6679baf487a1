"""Tiny datasets written in torchvision's exact on-disk formats, so the real loaders run on them."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np


def write_cifar10(root: Path, n_train: int = 120, n_test: int = 60, seed: int = 0) -> dict:
    """cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta} (pickled dicts, N x 3072 uint8)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train = rng.integers(0, 256, (n_train, 3072), dtype=np.uint8)
    train_labels = rng.integers(0, 10, n_train).tolist()
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, n_test).tolist()
    for i, part in enumerate(np.array_split(np.arange(n_train), 5), start=1):
        _pickle(folder / f"data_batch_{i}", {"data": train[part], "labels": [train_labels[j] for j in part],
                                             "batch_label": f"training batch {i} of 5"})
    _pickle(folder / "test_batch", {"data": test, "labels": test_labels, "batch_label": "testing batch 1 of 1"})
    _pickle(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)],
                                      "num_cases_per_batch": n_train // 5, "num_vis": 3072})
    return {"train": train.reshape(-1, 3, 32, 32), "train_labels": train_labels,
            "test": test.reshape(-1, 3, 32, 32), "test_labels": test_labels}


def write_fashion_mnist(root: Path, n_train: int = 120, n_test: int = 60, seed: int = 0) -> dict:
    """FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, uncompressed idx files."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "FashionMNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
        out[prefix] = (images, labels)
    return {"train": out["train"][0][:, None], "train_labels": out["train"][1].tolist(),
            "test": out["t10k"][0][:, None], "test_labels": out["t10k"][1].tolist()}


def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)
