"""PwoA on digits: no attack in the retrain, ADMM drives the weights to the sparse set, errors."""
import pytest
import torch

import fastprune.attacks.base as attack_base
import fastprune.ops.pgd as pgd_ops
from fastprune.models import get_model
from fastprune.nn import sparsity_report
from fastprune.prune import block_outputs, pwoa
from fastprune.prune.pwoa import _ADMM
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
         progress=False)
    assert abs(sparsity_report(student)["sparsity"] - 0.8) < 0.01
    x, y = digits.test.tensors
    with torch.no_grad():
        accuracy = (student.eval()(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.8, accuracy


def test_admm_pulls_the_weights_towards_the_sparse_set(digits):
    model = teacher_model(digits)
    admm = _ADMM(model, 0.9, rho=1.0, growth=1.35, rho_max=1.0)
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
    assert block_outputs(get_model("resnet18"))[:2] == ["layer1.0", "layer1.1"]
    assert block_outputs(get_model("cnn-small", 10, 1)) == ["2", "4", "8"]
    with pytest.raises(ValueError, match="teacher"):
        pwoa(get_model("cnn-small", 10, 1), None, digits.train, sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity"):
        pwoa(get_model("cnn-small", 10, 1), get_model("cnn-small", 10, 1), digits.train, sparsity=1.2)
    with pytest.raises(ValueError, match="mix_ratio"):
        pwoa(get_model("cnn-small", 10, 1), get_model("cnn-small", 10, 1), digits.train, sparsity=0.5, mix_ratio=2)


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
    assert len(calls) == 2, "with mix_ratio=1 every retrain batch is adversarial"


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
