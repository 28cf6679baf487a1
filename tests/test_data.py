"""Datasets: torchvision loaders on files in torchvision's formats, subsets, standardization, cache."""

import urllib.error

import numpy as np
import pytest
import torch
import torchvision

from fakes import write_cifar10, write_fashion_mnist
from sharpness import data
from sharpness.errors import DataUnavailable, SharpnessError


@pytest.fixture
def fake_cifar_checksums(monkeypatch):
    """Tiny fakes cannot match CIFAR-10's md5s: accept them in the test only."""
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)


def _standardized(train, test):
    tr = np.asarray(train, dtype=np.float64) / 255
    te = np.asarray(test, dtype=np.float64) / 255
    mean, std = tr.mean(0), tr.std(0)
    return (tr - mean) / std, (te - mean) / std


def test_cifar10_from_torchvision_layout(tmp_path, fake_cifar_checksums):
    raw = write_cifar10(tmp_path)
    d = data.load_dataset("cifar10", tmp_path)
    assert d.X_train.shape == (120, 3, 32, 32) and d.X_test.shape == (60, 3, 32, 32)
    assert d.X_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    tr, te = _standardized(raw["train"], raw["test"])
    assert np.allclose(d.X_train.numpy(), tr, atol=1e-5) and np.allclose(d.X_test.numpy(), te, atol=1e-5)
    assert d.y_train.tolist() == raw["train_labels"] and d.y_test.tolist() == raw["test_labels"]
    assert abs(float(d.X_train.mean())) < 1e-5  # per-pixel centred with the training statistics
    small = data.load_dataset("cifar10_1k", tmp_path)  # every 50th example, full-set statistics
    assert torch.equal(small.X_train, d.X_train[::50]) and torch.equal(small.y_train, d.y_train[::50])
    assert torch.equal(small.X_test, d.X_test[::50])


def test_fashion_mnist_from_torchvision_layout(tmp_path):
    raw = write_fashion_mnist(tmp_path)
    d = data.load_dataset("fashion_mnist", tmp_path)
    assert d.X_train.shape == (120, 1, 28, 28) and d.num_classes <= 10
    tr, te = _standardized(raw["train"], raw["test"])
    ok = np.isfinite(tr).all(axis=0)
    assert np.allclose(d.X_train.numpy()[:, ok], tr[:, ok], atol=1e-5)
    assert d.y_train.tolist() == raw["train_labels"]
    assert np.allclose(d.X_test.numpy()[:, ok], te[:, ok], atol=1e-5)  # standardized with the train statistics
    assert d.y_test.tolist() == raw["test_labels"]
    small = data.load_dataset("fashion_mnist_1k", tmp_path)
    assert torch.equal(small.X_train, d.X_train[::60]) and torch.equal(small.X_test, d.X_test[::60])


def test_prepared_cache_is_used(tmp_path):
    write_fashion_mnist(tmp_path)
    data.load_dataset("fashion_mnist_1k", tmp_path)
    cached = tmp_path / "prepared" / data.CACHE_VERSION / "fashion_mnist_1k.pt"
    assert cached.exists()
    for f in (tmp_path / "FashionMNIST" / "raw").iterdir():
        f.unlink()  # the raw files are not needed any more
    again = data.load_dataset("fashion_mnist_1k", tmp_path)  # would fail if a raw file were read
    assert len(again.y_train) == 2


def test_unwritable_cache_only_costs_time(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")  # $DATASETS that cannot hold a cache (like a read-only mount)
    first = data.load_dataset("digits", not_a_dir)
    assert torch.equal(data.load_dataset("digits", not_a_dir).X_train, first.X_train)


def test_damaged_cache_is_rebuilt(tmp_path):
    write_fashion_mnist(tmp_path)
    first = data.load_dataset("fashion_mnist", tmp_path)
    (tmp_path / "prepared" / data.CACHE_VERSION / "fashion_mnist.pt").write_bytes(b"garbage")
    assert torch.equal(data.load_dataset("fashion_mnist", tmp_path).X_train, first.X_train)


def test_offline_missing_files(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(DataUnavailable) as err:
        data.load_dataset("cifar10_1k", tmp_path)
    msg = str(err.value)
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "batches.meta" in msg
    assert "DATASETS" in msg and "offline" in msg


def test_digits():
    d = data.load_dataset("digits")
    assert d.X_train.shape == (1500, 1, 32, 32) and d.X_test.shape == (297, 1, 32, 32)
    assert d.num_classes == 10 and torch.isfinite(d.X_train).all()
    assert torch.allclose(d.X_train.mean(0), torch.zeros(1, 32, 32), atol=1e-5)


def test_strided_indices():
    assert data.strided_indices(50000, 1000)[:3].tolist() == [0, 50, 100]
    assert len(data.strided_indices(60000, 1000)) == 1000
    assert data.strided_indices(1500, 1000, 0).tolist() == list(range(1000))
    assert data.strided_indices(100, 10, 3)[:2].tolist() == [3, 13]
    assert data.strided_indices(10, 50).tolist() == list(range(10))
    with pytest.raises(SharpnessError):
        data.strided_indices(100, 10, 10)
    with pytest.raises(SharpnessError):
        data.strided_indices(100, 0)


def test_unknown_dataset():
    with pytest.raises(SharpnessError, match="valid datasets: digits, cifar10"):
        data.load_dataset("mnist")


def test_default_datasets_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("DATASETS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert data.datasets_dir() == tmp_path / "sharpness" / "datasets"


def test_cache_follows_the_raw_files(tmp_path):
    """New raw files (another download, a repaired file) are prepared again, subsets included."""
    write_fashion_mnist(tmp_path, n_train=120)
    data.load_dataset("fashion_mnist_1k", tmp_path)
    raw = write_fashion_mnist(tmp_path, n_train=180, seed=1)
    d = data.load_dataset("fashion_mnist", tmp_path)
    assert len(d.y_train) == 180 and d.y_train.tolist() == raw["train_labels"]
    small = data.load_dataset("fashion_mnist_1k", tmp_path)
    assert torch.equal(small.X_train, d.X_train[::60])


def _idx_file(tmp_path, name):
    return tmp_path / "FashionMNIST" / "raw" / name


@pytest.mark.parametrize("damage, fragment", [
    (lambda p: p.write_bytes(b"\x12\x34\x56\x78" + p.read_bytes()[4:]), "damaged"),
    (lambda p: p.write_bytes(b"\x00\x00\x09\x03" + p.read_bytes()[4:]), "damaged"),
    (lambda p: p.write_bytes(p.read_bytes()[:8 + 50]), "damaged"),  # truncated: 120 -> 50 labels
    (lambda p: p.write_bytes(p.read_bytes()[:4] + (100).to_bytes(4, "big") + p.read_bytes()[8:108]),
     "120 images but 100 labels"),
    (lambda p: p.write_bytes(p.read_bytes()[:8] + bytes([200]) + p.read_bytes()[9:]), "labels outside 0..9"),
])
def test_damaged_raw_files_are_one_clear_error(tmp_path, damage, fragment):
    """A damaged idx file is an error naming it, never a traceback or a silently wrong dataset."""
    write_fashion_mnist(tmp_path)
    damage(_idx_file(tmp_path, "train-labels-idx1-ubyte"))
    with pytest.raises(DataUnavailable) as err:
        data.load_dataset("fashion_mnist", tmp_path)
    assert fragment in str(err.value) and "FashionMNIST" in str(err.value)
    assert "download failed" not in str(err.value)  # the files are there: nothing was downloaded
    assert not (tmp_path / "prepared" / data.CACHE_VERSION / "fashion_mnist.pt").exists()


def test_data_command_reports_a_source_once(tmp_path, monkeypatch, capsys):
    from sharpness import cli

    write_fashion_mnist(tmp_path)
    damage = _idx_file(tmp_path, "t10k-labels-idx1-ubyte")
    damage.write_bytes(b"\x12\x34\x56\x78" + damage.read_bytes()[4:])
    monkeypatch.setenv("DATASETS", str(tmp_path))
    assert cli.main(["data", "fashion_mnist", "fashion_mnist_1k"]) == 2
    err = capsys.readouterr().err
    assert err.count("fashion_mnist is not available") == 1 and "subset of fashion_mnist" in err
    assert "Traceback" not in err
