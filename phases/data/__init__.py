"""Data sets held whole as tensors: scikit-learn's digits, CIFAR-10/100 from a local folder, and
synthetic teacher-student classification. Nothing is downloaded."""

from phases.data.datasets import Dataset, load_cifar, load_digits_dataset, teacher_student

__all__ = ["Dataset", "load_cifar", "load_digits_dataset", "teacher_student"]
