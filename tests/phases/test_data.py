"""Data sets: digits split, the CIFAR reader on a folder in the standard format, teacher-student."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from phases.data import load_cifar, load_digits_dataset, teacher_student


def test_digits_split_fixed_by_seed():
    first, again, other = load_digits_dataset(seed=0), load_digits_dataset(seed=0), load_digits_dataset(seed=1)
    assert first.x_train.shape == (1437, 1, 8, 8)
    assert first.x_test.shape == (360, 1, 8, 8)
    assert torch.equal(first.y_test, again.y_test)
    assert not torch.equal(first.y_test, other.y_test)
    # Per-channel normalisation from the training split.
    assert first.x_train.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert first.x_train.std().item() == pytest.approx(1.0, abs=1e-3)


def _write_cifar10(folder, per_batch: int = 20) -> np.ndarray:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    labels_all = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        labels_all.append(labels)
        with (folder / name).open("wb") as handle:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, handle, protocol=2)
    return np.concatenate(labels_all[:5])


def test_cifar10_reader(tmp_path):
    labels = _write_cifar10(tmp_path / "cifar-10-batches-py")
    data = load_cifar(tmp_path, classes=10)
    assert data.x_train.shape == (100, 3, 32, 32)
    assert data.x_test.shape == (20, 3, 32, 32)
    assert data.y_train.tolist() == labels.tolist()
    assert data.x_train.mean(dim=(0, 2, 3)).abs().max().item() < 1e-5


def test_cifar_missing_folder_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py/data_batch_1 not found.*cs.toronto.edu"):
        load_cifar(tmp_path, classes=10)


def test_cifar_malformed_file_named(tmp_path):
    _write_cifar10(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3 is malformed"):
        load_cifar(tmp_path, classes=10)


def test_cifar_refuses_code_in_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder)
    with (folder / "data_batch_1").open("wb") as handle:
        pickle.dump({b"data": print, b"labels": []}, handle, protocol=2)
    with pytest.raises(ValueError, match="malformed"):
        load_cifar(tmp_path, classes=10)


def test_teacher_student_is_seeded():
    first, again = teacher_student(samples=200, test_samples=50, seed=3), teacher_student(samples=200, test_samples=50, seed=3)
    assert first.x_train.shape == (200, 32)
    assert torch.equal(first.y_train, again.y_train)
    assert first.y_train.unique().numel() > 1
