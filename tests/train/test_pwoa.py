"""PwoA on digits: no attack in the retrain, ADMM drives the weights to the sparse set, errors."""
import pytest
import torch

import fastprune.attacks.base as attack_base
import fastprune.ops.pgd as pgd_ops
from fastprune.models import get_model
from fastprune.nn import sparsity_report
from fastprune.prune import block_outputs, pwoa
from fastprune.prune.pwoa import _ADMM, pruned_layer_names
from fastprune.train import fit


def teacher_model(digits):
    torch.manual_seed(0)
    model = get_model("cnn-small", 10, 1)
    fit(model, digits.train, epochs=4, lr=0.05, batch_size=64, progress=False)
    return model.eval()


def test_pwoa_computes_no_adversarial_example_and_prunes(digits, monkeypatch):
    teacher = teacher_model(digits)
    student = get_model("cnn-small", 10, 1)
    student.load_state_dict(teacher.state_dict())

    def forbidden(*args, **kwargs):
        raise AssertionError("PwoA must not compute adversarial examples")

    monkeypatch.setattr(attack_base.Attack, "__call__", forbidden)
    monkeypatch.setattr(pgd_ops, "_run_backend", forbidden)
    pwoa(student, teacher, digits.train, sparsity=0.8, admm_epochs=3, retrain_epochs=2, admm_lr=0.01,
         retrain_lr=0.01, temperature=4.0, alpha=1.0, rho=0.1, admm_every=1, num_classes=10, batch_size=64,
         progress=False, prune_layers="all")
    assert abs(sparsity_report(student)["sparsity"] - 0.8) < 0.01
    x, y = digits.test.tensors
    with torch.no_grad():
        accuracy = (student.eval()(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.8, accuracy


def test_admm_pulls_the_weights_towards_the_sparse_set(digits):
    model = teacher_model(digits)
    admm = _ADMM(model, pruned_layer_names(model, "all"), 0.9, rho=1.0, growth=1.35, rho_max=1.0)
    before = admm.distance()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(30):
        opt.zero_grad()
        admm.penalty().backward()
        opt.step()
    assert admm.distance() < 0.5 * before


def test_block_outputs_and_errors(digits):
    # PwoA's models return the stem (ResNet) or conv1 (WRN), every block and the pooled feature
    resnet = block_outputs(get_model("resnet18"))
    assert resnet[:3] == ["stem_relu", "layer1.0", "layer1.1"] and resnet[-1] == "pool" and len(resnet) == 10
    wrn = block_outputs(get_model("wrn-34-10"))
    assert wrn[:2] == ["conv1", "block1.0"] and wrn[-1] == "pool" and len(wrn) == 17
    assert block_outputs(get_model("cnn-small", 10, 1)) == ["2", "4", "8"]
    with pytest.raises(ValueError, match="teacher"):
        pwoa(get_model("cnn-small", 10, 1), None, digits.train, sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity"):
        pwoa(get_model("cnn-small", 10, 1), get_model("cnn-small", 10, 1), digits.train, sparsity=1.2)
    with pytest.raises(ValueError, match="mix_ratio"):
        pwoa(get_model("cnn-small", 10, 1), get_model("cnn-small", 10, 1), digits.train, sparsity=0.5, mix_ratio=2)


def test_pwoa_prunes_convs_and_fc_layers_as_its_code_does(digits):
    """PwoA's code prunes 4-D conv weights and parameters named fc.weight: ResNet-18's `linear` and a
    Sequential's unnamed linears stay dense unless prune_layers="all"."""
    from torch import nn

    resnet = pruned_layer_names(get_model("resnet18"))
    assert "linear" not in resnet and "conv1" in resnet and "layer2.0.shortcut.0" in resnet and len(resnet) == 20
    assert "linear" in pruned_layer_names(get_model("resnet18"), "all")
    lenet3 = nn.Sequential()
    lenet3.add_module("conv1", nn.Conv2d(1, 4, 5))
    lenet3.add_module("fc1", nn.Linear(4, 8))
    lenet3.add_module("fc", nn.Linear(8, 10))
    assert pruned_layer_names(lenet3) == ["conv1", "fc"]
    assert pruned_layer_names(lenet3, skip=("conv1",)) == ["fc"]
    teacher = teacher_model(digits)
    student = get_model("cnn-small", 10, 1)
    student.load_state_dict(teacher.state_dict())
    small = torch.utils.data.TensorDataset(*(t[:128] for t in digits.train.tensors))
    pwoa(student, teacher, small, sparsity=0.9, admm_epochs=1, retrain_epochs=1, num_classes=10, batch_size=64,
         progress=False)
    layers = sparsity_report(student)["layers"]
    assert {n for n, r in layers.items() if r["sparsity"] > 0.8} == {"1", "3"}  # the two convs only
    with pytest.raises(ValueError, match="prune_layers"):
        pruned_layer_names(student, "some")
    with pytest.raises(ValueError, match="skip"):
        pruned_layer_names(get_model("resnet18"), skip=("nope",))


def test_mix_ratio_mixes_in_pgd_batches(digits, monkeypatch):
    calls = []
    real = attack_base.Attack.__call__
    monkeypatch.setattr(attack_base.Attack, "__call__", lambda self, x, y: calls.append(1) or real(self, x, y))
    teacher = teacher_model(digits)
    student = get_model("cnn-small", 10, 1)
    student.load_state_dict(teacher.state_dict())
    small = torch.utils.data.TensorDataset(*(t[:128] for t in digits.train.tensors))
    pwoa(student, teacher, small, sparsity=0.5, admm_epochs=1, retrain_epochs=1, mix_ratio=1.0, num_classes=10,
         batch_size=64, progress=False)
    assert len(calls) == 4, "with mix_ratio=1 every batch of both stages (2 + 2 here) is adversarial"


def test_distillation_loss_matches_the_papers_elementwise_mean():
    import warnings

    import torch.nn.functional as F

    from fastprune.prune import distillation_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(16, 10, dtype=torch.float64), torch.randn(16, 10, dtype=torch.float64)
    with warnings.catch_warnings():  # reduction="mean" warns that it is not the per-sample KL
        warnings.simplefilter("ignore")
        paper = F.kl_div(F.log_softmax(student / 30, 1), F.softmax(teacher / 30, 1), reduction="mean") * 10 * 30 ** 2
    assert distillation_loss(student, teacher, 30.0, 10.0).item() == pytest.approx(paper.item(), rel=1e-12)


def test_admm_reprojects_z_each_epoch_and_updates_the_dual_on_schedule(digits, monkeypatch):
    """PwoA's code at the start of every ADMM epoch: Z = proj(W); on update epochs then Z = proj(W + U),
    U += W - Z. The ADMM stage's learning rate is cyclic over each admm_every-epoch period."""
    import importlib

    pwoa_module = importlib.import_module("fastprune.prune.pwoa")  # the package re-exports the function

    events = []
    real_reproject, real_update = pwoa_module._ADMM.reproject, pwoa_module._ADMM.update
    monkeypatch.setattr(pwoa_module._ADMM, "reproject", lambda self: events.append("z") or real_reproject(self))
    monkeypatch.setattr(pwoa_module._ADMM, "update", lambda self: events.append("u") or real_update(self))
    lrs = []
    real_fit = pwoa_module.fit

    def fit_spy(model, train, **kwargs):
        if kwargs.get("run_dir") is None and kwargs.get("extra_state") is not None and "on_epoch_end" in kwargs:
            user_end = kwargs["on_epoch_end"]
            kwargs["on_epoch_end"] = lambda epoch, row: lrs.append(row["lr"]) or user_end(epoch, row)
        return real_fit(model, train, **kwargs)

    monkeypatch.setattr(pwoa_module, "fit", fit_spy)
    teacher = teacher_model(digits)
    student = get_model("cnn-small", 10, 1)
    student.load_state_dict(teacher.state_dict())
    small = torch.utils.data.TensorDataset(*(t[:64] for t in digits.train.tensors))
    pwoa(student, teacher, small, sparsity=0.5, admm_epochs=6, retrain_epochs=1, admm_every=3, num_classes=10,
         batch_size=64, progress=False, prune_layers="all")
    assert events == ["z", "z", "z", "u", "z", "z", "z", "u"]
    # one step per epoch here: the rate after each epoch's step is the next epoch's (restart every 3)
    assert lrs == pytest.approx([0.001, 0.0001, 0.01, 0.001, 0.0001, 0.01])

    model = teacher_model(digits)
    admm = _ADMM(model, pruned_layer_names(model, "all"), 0.5, rho=1.0, growth=1.35, rho_max=1.0)
    with torch.no_grad():
        for m in admm.layers:
            m.weight.mul_(-2)
    admm.u = [torch.full_like(u, 0.01) for u in admm.u]
    admm.reproject()
    for m, z, k in zip(admm.layers, admm.z, admm.k):
        assert torch.equal(z, _ADMM._project(m.weight.detach(), k))
    u_before = [u.clone() for u in admm.u]
    admm.update()
    for m, z, u, u0, k in zip(admm.layers, admm.z, admm.u, u_before, admm.k):
        assert torch.equal(z, _ADMM._project(m.weight.detach() + u0, k))
        torch.testing.assert_close(u, u0 + m.weight.detach() - z)


@pytest.mark.parametrize("name,count,first,last", [
    ("torchvision:resnet18", 8, "layer1.0", "layer4.1"),            # the blocks of each stage
    ("torchvision:mobilenet_v2", 19, "features.0", "features.18"),  # ReLU6 blocks, no nn.ReLU anywhere
    ("torchvision:efficientnet_b0", 9, "features.0", "features.8"),  # SiLU stages
    ("torchvision:convnext_tiny", 8, "features.0", "features.7"),   # GELU stages (top level, not inner blocks)
    ("torchvision:vit_b_16", 12, "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_11"),
])
def test_block_outputs_of_models_nobody_here_wrote(name, count, first, last):
    pytest.importorskip("torchvision")
    plain = block_outputs(get_model(name, 10, 3))
    assert len(plain) == count and plain[0] == first and plain[-1] == last
    wrapped = block_outputs(get_model(name, 10, 3, normalize="imagenet"))  # ImageInput: searched inside
    assert wrapped == ["model." + n for n in plain]


def test_timm_resnet_gives_its_blocks_not_its_activations():
    pytest.importorskip("timm")
    names = block_outputs(get_model("timm:resnet18", 10, 3))
    assert names[0] == "layer1.0" and names[-1] == "layer4.1" and len(names) == 8


def test_bad_hidden_layers_stop_pwoa_before_its_admm_stage(digits, monkeypatch):
    import sys

    pwoa_module = sys.modules["fastprune.prune.pwoa"]  # the package exports the function under the same name

    def no_training(*args, **kwargs):
        raise AssertionError("the ADMM stage ran before the hidden layers were checked")

    monkeypatch.setattr(pwoa_module, "fit", no_training)
    teacher = get_model("cnn-small", 10, 1)
    with pytest.raises(ValueError, match="hsic_layers"):
        pwoa(get_model("cnn-small", 10, 1), teacher, digits.train, sparsity=0.5, hsic_layers=["no.such.layer"])
    with pytest.raises(ValueError, match="found no hidden layers"):
        block_outputs(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)))


def test_mixed_batches_get_the_base_loss_pwoa_asks_for(digits, monkeypatch):
    """mix_ratio 1: base_loss "ce" replaces every batch by the attack's; "trades"/"mart" keep the
    clean batch and add ce_weight times that loss; with ce_weight 0 they train on the clean batch."""
    import fastprune.train.objectives as objectives

    calls = {"attack": 0, "TRADES": 0, "MART": 0}

    def attack(x, y):
        calls["attack"] += 1
        return x

    for name in ("TRADES", "MART"):
        original = getattr(objectives, name).__call__

        def counted(self, model, x, y, name=name, original=original):
            calls[name] += 1
            return original(self, model, x, y)

        monkeypatch.setattr(getattr(objectives, name), "__call__", counted)
    teacher = get_model("cnn-small", 10, 1)
    x, y = digits.train.tensors
    data = (x[:128], y[:128])
    options = dict(sparsity=0.5, admm_epochs=1, retrain_epochs=1, batch_size=64, progress=False, num_classes=10,
                   mix_ratio=1.0, mix_attack=attack, prune_layers="all")
    pwoa(get_model("cnn-small", 10, 1), teacher, data, base_loss="ce", ce_weight=1.0, **options)
    assert calls == {"attack": 4, "TRADES": 0, "MART": 0}  # 2 batches x 2 stages
    pwoa(get_model("cnn-small", 10, 1), teacher, data, base_loss="trades", ce_weight=1.0, **options)
    pwoa(get_model("cnn-small", 10, 1), teacher, data, base_loss="mart", ce_weight=0.5, **options)
    pwoa(get_model("cnn-small", 10, 1), teacher, data, base_loss="trades", ce_weight=0.0, **options)
    assert calls == {"attack": 4, "TRADES": 4, "MART": 4}
    with pytest.raises(ValueError, match="base_loss"):
        pwoa(get_model("cnn-small", 10, 1), teacher, data, base_loss="hinge", **options)
