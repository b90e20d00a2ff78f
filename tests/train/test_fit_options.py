"""fit()'s papers' options: optimisers, learning-rate schedules (hand-computed sequences) and keeping
the epoch with the best robust accuracy (HYDRA's and PwoA's model_best), resumed exactly."""
import math

import pytest
import torch

from fastprune.models import get_model
from fastprune.train import fit, make_objective
from fastprune.train.loops import lr_factor

from .test_training import Interrupt


@pytest.fixture()
def small_train(digits):
    x, y = digits.train.tensors
    return torch.utils.data.TensorDataset(x[:128], y[:128])


def lr_sequence(small_train, **options):
    """The learning rate of every optimiser step (2 steps per epoch: 128 images, batch 64)."""
    torch.manual_seed(0)
    model = get_model("cnn-small", 10, 1)
    seen = []
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: seen.append(optimizer.param_groups[0]["lr"]))
    try:
        fit(model, small_train, epochs=6, lr=0.1, batch_size=64, progress=False, **options)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("schedule,expected", [
    ("multistep", [0.1] * 4 + [0.01] * 4 + [0.001] * 4),            # milestones at epochs 2 and 4
    ("cyclic", [0.1, 0.1, 0.01, 0.01, 0.001, 0.001] * 2),           # PwoA's ADMM stage, every 3 epochs
    ("constant", [0.1] * 12),
    ("cosine", [0.05 * (1 + math.cos(math.pi * s / 12)) for s in range(12)]),
])
def test_schedules_give_the_hand_computed_rates(small_train, schedule, expected):
    got = lr_sequence(small_train, schedule=schedule, milestones=(2, 4))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert lr_factor("multistep", 7, 2, 12, (2, 4)) == pytest.approx(0.1)  # step 7 is epoch 3
    assert lr_factor("multistep", 8, 2, 12, (2, 4)) == pytest.approx(0.01)  # step 8 starts epoch 4
    # PwoA's admm_adjust_learning_rate with 6- and 9-epoch ADMM periods: tenfold every third
    assert [lr_factor("cyclic", e, 1, 100, cycle_epochs=6) for e in range(7)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01, 1])
    assert [lr_factor("cyclic", e, 1, 100, cycle_epochs=9) for e in range(9)] == pytest.approx(
        [1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01])


def test_adam_is_used(small_train):
    torch.manual_seed(0)
    model = get_model("cnn-small", 10, 1)
    fit(model, small_train, epochs=1, lr=1e-3, batch_size=64, progress=False, optimizer="adam", schedule="constant")
    # Adam's first step moves every weight by about lr (sign of the gradient), SGD's by lr * grad.
    torch.manual_seed(0)
    fresh = get_model("cnn-small", 10, 1)
    first = next(p for p in fresh.parameters() if p.dim() == 4)
    moved = (next(p for p in model.parameters() if p.dim() == 4) - first).abs()
    assert moved.max() < 2 * 2e-3 + 1e-6 and moved.median() > 2e-4


def test_keep_best_robust_ends_with_the_best_epoch_and_resumes_exactly(tmp_path, small_train, digits):
    val = tuple(t[:64] for t in digits.test.tensors)
    objective = make_objective("pgd", eps=0.1, alpha=0.025, steps=2)

    def run(run_dir, stop_after=None):
        torch.manual_seed(0)
        model = get_model("cnn-small", 10, 1)
        states = []

        def on_end(epoch, row):
            states.append({k: v.clone() for k, v in model.state_dict().items()})
            if stop_after is not None and epoch == stop_after:
                raise Interrupt

        history = fit(model, small_train, objective=objective, epochs=4, lr=0.1, batch_size=64, val=val,
                      run_dir=str(run_dir), progress=False, on_epoch_end=on_end)
        return model, history, states

    model, history, states = run(tmp_path / "a")
    robust = [h["val_robust"] for h in history]
    best = robust.index(max(robust))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, states[best][name]), name
    with pytest.raises(Interrupt):
        run(tmp_path / "b", stop_after=1)
    resumed, resumed_history, _ = run(tmp_path / "b")
    assert [h["val_robust"] for h in resumed_history] == robust
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    # keep="last" trains the same trajectory (the validation attack has its own generator)
    torch.manual_seed(0)
    last = get_model("cnn-small", 10, 1)
    fit(last, small_train, objective=objective, epochs=4, lr=0.1, batch_size=64, keep="last", progress=False)
    for name, tensor in last.state_dict().items():
        assert torch.equal(tensor, states[-1][name]), name


@pytest.mark.parametrize("options,match", [
    (dict(optimizer="rmsprop"), "optimizer"),
    (dict(schedule="linear"), "schedule"),
    (dict(schedule="multistep"), "milestones"),
    (dict(schedule="multistep", milestones=(0,)), "milestones"),
    (dict(gamma=0), "gamma"),
    (dict(keep="best"), "keep"),
    (dict(keep="best_robust"), "val"),
])
def test_bad_options(small_train, options, match):
    model = get_model("cnn-small", 10, 1)
    with pytest.raises(ValueError, match=match):
        fit(model, small_train, epochs=1, progress=False, **options)


def test_fit_takes_a_pair_a_dataset_and_a_dataloader(small_train):
    """The same training set as a TensorDataset, an (images, labels) pair, a plain Dataset of items and
    a DataLoader of batches trains the same model."""
    images, labels = small_train.tensors

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return images[i], int(labels[i])

    results = []
    for data in (small_train, (images, labels), Items(), torch.utils.data.DataLoader(small_train, batch_size=50)):
        torch.manual_seed(0)
        model = get_model("cnn-small", 10, 1)
        fit(model, data, epochs=1, lr=0.05, batch_size=64, progress=False)
        results.append(model.state_dict())
    for other in results[1:]:  # (a concatenated copy may round differently in the convolutions: 1e-8)
        for name, tensor in results[0].items():
            torch.testing.assert_close(tensor, other[name], rtol=1e-5, atol=1e-6)


def test_a_run_that_ends_at_chance_level_says_so(digits):
    import warnings

    torch.manual_seed(0)
    model = get_model("cnn-small", 10, 1)
    with pytest.warns(UserWarning, match="training ended at chance level"):
        fit(model, digits.train, epochs=1, lr=1e-7, batch_size=64, progress=False)  # learns nothing
    model = get_model("cnn-small", 10, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        fit(model, digits.train, epochs=2, lr=0.05, batch_size=64, progress=False)


def test_labels_of_any_integer_type_train_as_int64_ones_do(digits):
    x, y = digits.train.tensors
    runs = []
    for labels in (y, y.int(), y.to(torch.int16)):
        torch.manual_seed(0)
        model = get_model("cnn-small", 10, 1)
        fit(model, (x, labels), epochs=1, lr=0.05, batch_size=64, progress=False)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
