"""Cluttered digits: scikit-learn's 1,797 real 8x8 handwritten digits on 32x32 canvases.

Each digit is scaled to 16x16 and placed at a random position on a 32x32 canvas together with
fragments of other digits (clutter), so that *where to look* matters. Everything is
deterministic given the seed, and the train/test split is fixed (it does not depend on the seed).
The data ship inside scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

__all__ = ["N_TEST", "N_TRAIN", "cluttered_digits"]

N_TRAIN = 1300
N_TEST = 497  # 1,797 digits in all
_SPLIT_SEED = 20161212  # the split never changes


def cluttered_digits(
    seed: int = 0, canvas: int = 32, fragments: int = 4
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The cluttered-digits data set, standardised, as ``(x_train, y_train, x_test, y_test)``.

    Args:
        seed: Seed of the placement of digits and clutter.
        canvas: Canvas size (32 for CIFAR-style networks).
        fragments: Number of 6x6 fragments of other digits added to each canvas.

    Returns:
        Images ``(N, 1, canvas, canvas)`` in float32 (zero mean, unit variance over the
        training set) and integer labels; 1,300 training and 497 test images.

    Example:
        ```python
        from athooks.demo import cluttered_digits

        x, y, xt, yt = cluttered_digits(seed=0)
        print(x.shape, xt.shape, y[:10].tolist())
        ```
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    labels = digits.target.astype(np.int64)
    big = np.kron(images, np.ones((1, 2, 2), dtype=np.float32))  # (1797, 16, 16)
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(big))
    rng = np.random.default_rng(seed)
    out = np.zeros((len(big), canvas, canvas), dtype=np.float32)
    size = big.shape[1]
    for i in range(len(big)):
        page = out[i]
        for _ in range(fragments):  # clutter first, the digit on top
            other = big[rng.integers(len(big))]
            r, c = rng.integers(0, size - 6, size=2)
            piece = other[r : r + 6, c : c + 6]
            pr, pc = rng.integers(0, canvas - 6, size=2)
            np.maximum(page[pr : pr + 6, pc : pc + 6], piece, out=page[pr : pr + 6, pc : pc + 6])
        r, c = rng.integers(0, canvas - size + 1, size=2)
        np.maximum(page[r : r + size, c : c + size], big[i], out=page[r : r + size, c : c + size])
    x = torch.from_numpy(out).unsqueeze(1)
    y = torch.from_numpy(labels)
    train, test = order[:N_TRAIN], order[N_TRAIN:]
    x_train, x_test = x[train], x[test]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y[train], (x_test - mean) / std, y[test]
