"""Offline datasets for the launchers: nothing is downloaded at run time.

* ``digits``: scikit-learn's 1,797 handwritten 8x8 digits (ship with the package).
* ``teacher``: a synthetic classification task whose labels come from a fixed random
  teacher network — as hard as the teacher makes it, reproducible from the seed.
* ``stdlib``: characters of Python's own standard library source (every machine has it),
  for a character-level language model.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sysconfig

import torch

Tensor = torch.Tensor


@dataclasses.dataclass
class ClassificationData:
    """Train/test inputs and labels. x: fp32 [n, *input_shape]; y: int64 [n]."""

    xtr: Tensor
    ytr: Tensor
    xte: Tensor
    yte: Tensor
    classes: int

    def shard(self, rank: int, size: int) -> "ClassificationData":
        """This rank's training shard (the test set stays whole)."""
        return dataclasses.replace(self, xtr=self.xtr[rank::size], ytr=self.ytr[rank::size])


@dataclasses.dataclass
class TextData:
    """Character ids of a corpus split 90/10. train/test: int64 [n]; vocab: characters."""

    train: Tensor
    test: Tensor
    vocab: list

    def shard(self, rank: int, size: int) -> "TextData":
        n = len(self.train) // size
        return dataclasses.replace(self, train=self.train[rank * n:(rank + 1) * n])


def digits(seed: int, image: bool = False) -> ClassificationData:
    """Standardized digits, 80/20 split fixed by ``seed``; ``image`` keeps [1, 8, 8]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(x))
    mean, std = x[:n_train].mean(0), x[:n_train].std(0).clamp_min(1e-3)
    x = (x - mean) / std
    if image:
        x = x.view(-1, 1, 8, 8)
    return ClassificationData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], 10)


def teacher(seed: int, n_train: int = 8192, n_test: int = 2048, dim: int = 32, classes: int = 10,
            data_seed: int = 1234) -> ClassificationData:
    """Labels from a random 2-layer tanh teacher (fixed by ``data_seed``, so every run and
    rank sees the same task); inputs standard normal. ``seed`` only shuffles."""
    g = torch.Generator().manual_seed(data_seed)
    w1 = torch.randn(dim, 128, generator=g) / dim**0.5
    w2 = torch.randn(128, classes, generator=g) / 128**0.5
    x = torch.randn(n_train + n_test, dim, generator=g)
    y = (torch.tanh(x @ w1) @ w2).argmax(1)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))
    return ClassificationData(x[:n_train][perm], y[:n_train][perm], x[n_train:], y[n_train:], classes)


@functools.lru_cache(maxsize=2)
def stdlib(max_chars: int = 400_000) -> TextData:
    """Source text of the standard library's top-level modules (sorted, so identical on every
    rank and machine with the same Python), mapped to character ids. Cached: in-process
    ranks and consecutive runs share it (callers take views through ``shard``, never write)."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
            text = f.read()
        chunks.append(text)
        total += len(text)
        if total >= max_chars:
            break
    text = "".join(chunks)[:max_chars]
    vocab = sorted(set(text))
    table = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([table[c] for c in text], dtype=torch.int64)
    split = int(0.9 * len(ids))
    return TextData(ids[:split], ids[split:], vocab)

