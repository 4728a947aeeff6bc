"""Data sets for the network kind, each returned whole as tensors with per-channel normalisation.

- digits: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), split into train and test
  by a seeded stratified split.
- CIFAR-10 / CIFAR-100: read from a local folder in the standard "python version" format
  (`cifar-10-batches-py/data_batch_1..5`, `test_batch`; `cifar-100-python/train`, `test`). Nothing
  is downloaded; a missing or malformed folder raises an error naming the expected file.
- teacher-student: Gaussian inputs labelled by the argmax of a random linear teacher.

Normalisation statistics come from the training split only; no augmentation.
"""

from __future__ import annotations

import io
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass
class Dataset:
    """A data set held whole: images (N, C, H, W) or features (N, F) as float32, labels as int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: str | torch.device) -> "Dataset":
        return Dataset(self.name, self.x_train.to(device), self.y_train.to(device), self.x_test.to(device), self.y_test.to(device), self.classes)


def _normalise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std normalisation of (N, C, H, W) arrays with training-set statistics."""
    axes = (0, 2, 3)
    mean = train.mean(axis=axes, keepdims=True)
    std = train.std(axis=axes, keepdims=True) + 1e-8
    return (train - mean) / std, (test - mean) / std


def load_digits_dataset(seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """scikit-learn's digits as (N, 1, 8, 8) images; the stratified split is fixed by `seed`."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float32)[:, None]  # (N, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=test_fraction, random_state=seed, stratify=digits.target
    )
    x_train, x_test = _normalise(x_train, x_test)
    return Dataset("digits", *_tensors(x_train, y_train, x_test, y_test), classes=10)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds dicts, lists, bytes and numpy arrays: CIFAR batches need no more,
    and refusing other globals keeps a tampered file from running code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(
            f"CIFAR file {path} not found; download the CIFAR 'python version' archive from {CIFAR_URL}, "
            f"extract it, and pass the folder that contains {path.parent.name}/"
        )
    try:
        with path.open("rb") as handle:
            batch = _ArrayUnpickler(io.BufferedReader(handle), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as error:
        raise ValueError(f"CIFAR file {path} is malformed ({error}); expected the 'python version' batch format from {CIFAR_URL}") from None
    if len(labels) != len(data):
        raise ValueError(f"CIFAR file {path} has {len(data)} images but {len(labels)} labels")
    return data, labels


def load_cifar(root: str | Path, classes: int = 10) -> Dataset:
    """CIFAR-10 (classes=10) or CIFAR-100 (classes=100) from `root` in the standard python format.

    root: the folder that contains `cifar-10-batches-py/` or `cifar-100-python/` (or that folder
    itself). Raises FileNotFoundError naming the missing file and where to get it, and ValueError
    for a malformed file.
    """
    if classes not in (10, 100):
        raise ValueError(f"CIFAR has 10 or 100 classes, got {classes}")
    root = Path(root)
    folder_name = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
    folder = root if root.name == folder_name else root / folder_name
    if classes == 10:
        parts = [_read_batch(folder / f"data_batch_{i}", b"labels") for i in range(1, 6)]
        x_train = np.concatenate([p[0] for p in parts])
        y_train = np.concatenate([p[1] for p in parts])
        x_test, y_test = _read_batch(folder / "test_batch", b"labels")
    else:
        x_train, y_train = _read_batch(folder / "train", b"fine_labels")
        x_test, y_test = _read_batch(folder / "test", b"fine_labels")
    x_train, x_test = _normalise(x_train.astype(np.float32) / 255.0, x_test.astype(np.float32) / 255.0)
    return Dataset(f"cifar{classes}", *_tensors(x_train, y_train, x_test, y_test), classes=classes)


def teacher_student(samples: int = 2000, features: int = 32, classes: int = 10, test_samples: int = 1000, seed: int = 0) -> Dataset:
    """Gaussian inputs (N, features) labelled by argmax of a random linear teacher; seeded."""
    rng = np.random.default_rng(seed)
    teacher = rng.standard_normal((features, classes))
    x = rng.standard_normal((samples + test_samples, features)).astype(np.float32)
    y = np.argmax(x @ teacher, axis=1)
    return Dataset("teacher_student", *_tensors(x[:samples], y[:samples], x[samples:], y[samples:]), classes=classes)


def _tensors(x_train, y_train, x_test, y_test) -> tuple[torch.Tensor, ...]:
    return (
        torch.as_tensor(np.ascontiguousarray(x_train), dtype=torch.float32),
        torch.as_tensor(y_train, dtype=torch.int64),
        torch.as_tensor(np.ascontiguousarray(x_test), dtype=torch.float32),
        torch.as_tensor(y_test, dtype=torch.int64),
    )
