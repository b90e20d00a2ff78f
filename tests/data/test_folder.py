"""folder:PATH data sets (fastprune/data/folder.py): the user's own images in ImageFolder's layout."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastprune.cli import main
from fastprune.data import get_dataset


def write_split(root, split, arrays_by_class, mode):
    for name, arrays in arrays_by_class.items():
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, array in enumerate(arrays):
            Image.fromarray(array, mode=mode).save(folder / f"{i}.png")


def make_folder(root, mode="L", size=(6, 5), per_class=(4, 2), classes=("cat", "ant", "bee"), seed=0):
    rng = np.random.default_rng(seed)
    shape = size if mode == "L" else size + (3,)
    data = {}
    for split, count in zip(("train", "test"), per_class):
        data[split] = {c: [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)] for c in classes}
        write_split(root, split, data[split], mode)
    return data


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3)])
def test_folder_images_load_as_0_1_tensors_with_sorted_class_labels(tmp_path, mode, channels):
    data = make_folder(tmp_path, mode)
    splits = get_dataset(f"folder:{tmp_path}")
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (3, channels, (6, 5))
    x, y = splits.train.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (12, channels, 6, 5)
    # labels follow the sorted class names: ant 0, bee 1, cat 2; files in sorted order within a class
    for label, name in enumerate(sorted(data["train"])):
        for i, array in enumerate(data["train"][name]):
            want = torch.from_numpy(array).float() / 255
            want = want[None] if mode == "L" else want.permute(2, 0, 1)
            row = (y == label).nonzero()[i].item()
            torch.testing.assert_close(x[row], want, rtol=0, atol=0)
    assert splits.test.tensors[0].shape == (6, channels, 6, 5)


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no such folder"):
        get_dataset(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="expected .*/train/<class>"):
        get_dataset(f"folder:{tmp_path}")
    make_folder(tmp_path / "sizes", size=(6, 5))
    Image.fromarray(np.zeros((7, 5), np.uint8), mode="L").save(tmp_path / "sizes" / "test" / "ant" / "odd.png")
    with pytest.raises(ValueError, match="all images must have one size"):
        get_dataset(f"folder:{tmp_path / 'sizes'}")
    make_folder(tmp_path / "extra")
    write_split(tmp_path / "extra", "test", {"zebra": [np.zeros((6, 5), np.uint8)]}, "L")
    with pytest.raises(ValueError, match="classes the train split lacks"):
        get_dataset(f"folder:{tmp_path / 'extra'}")


def test_cli_trains_and_evaluates_on_a_folder(tmp_path):
    make_folder(tmp_path / "imgs", size=(8, 8), per_class=(6, 3))
    run = tmp_path / "run"
    assert main(["train", "--model", "cnn-small", "--data", f"folder:{tmp_path / 'imgs'}", "--epochs", "1",
                 "--objective", "natural", "--out", str(run), "--quiet"]) == 0
    assert main(["eval", "--checkpoint", str(run / "model.pt"), "--data", f"folder:{tmp_path / 'imgs'}",
                 "--attacks", "clean", "--quiet"]) == 0
