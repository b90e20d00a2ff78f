"""Public checkpoints in the papers' formats: state_dicts built from the papers' own layer names and
forward passes (TRADES/LBGAT/RobustBench WideResNet, PwoA's ResNet-18 and LeNet3), loaded into the
zoo's models, must compute the same logits on raw [0, 1] inputs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastprune.models import get_model, load_pretrained


class TradesBlock(nn.Module):
    """TRADES' WideResNet BasicBlock, with its names and its forward."""

    def __init__(self, in_planes, out_planes, stride):
        super().__init__()
        self.bn1, self.relu1 = nn.BatchNorm2d(in_planes), nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride, 1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(out_planes), nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, 1, 1, bias=False)
        self.equal = in_planes == out_planes
        self.convShortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride, 0, bias=False)

    def forward(self, x):
        if not self.equal:
            x = self.relu1(self.bn1(x))
            out = x
        else:
            out = self.relu1(self.bn1(x))
        out = self.conv2(self.relu2(self.bn2(self.conv1(out))))
        return (x if self.equal else self.convShortcut(x)) + out


class TradesNetworkBlock(nn.Module):
    def __init__(self, n, in_planes, out_planes, stride):
        super().__init__()
        self.layer = nn.Sequential(*[TradesBlock(in_planes if i == 0 else out_planes, out_planes,
                                                 stride if i == 0 else 1) for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class TradesWideResNet(nn.Module):
    """TRADES' WideResNet (raw [0, 1] inputs), including its unused sub_block1."""

    def __init__(self, depth=28, widen=4, num_classes=10):
        super().__init__()
        n, c = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(3, c[0], 3, 1, 1, bias=False)
        self.block1 = TradesNetworkBlock(n, c[0], c[1], 1)
        self.sub_block1 = TradesNetworkBlock(n, c[0], c[1], 1)
        self.block2 = TradesNetworkBlock(n, c[1], c[2], 2)
        self.block3 = TradesNetworkBlock(n, c[2], c[3], 2)
        self.bn1, self.relu = nn.BatchNorm2d(c[3]), nn.ReLU()
        self.fc = nn.Linear(c[3], num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.avg_pool2d(self.relu(self.bn1(out)), 8)
        return self.fc(out.flatten(1))


def randomise_batchnorm(model):
    """Non-trivial running statistics and affine parameters, so a wrong mapping shows."""
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def test_trades_wide_resnet_checkpoint(tmp_path):
    torch.manual_seed(0)
    theirs = randomise_batchnorm(TradesWideResNet(28, 4))
    path = tmp_path / "trades.pt"
    # DataParallel prefixes inside {"state_dict": ...}, as such files are distributed
    torch.save({"state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}, "epoch": 76}, path)
    ours = load_pretrained("wrn-28-4", str(path))
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
    # RobustBench models that normalise inside carry mu and sigma: the zoo model then normalises alike
    mu, sigma = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.save({**theirs.state_dict(), "mu": mu, "sigma": sigma}, path)
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained("wrn-28-4", str(path))(x), theirs((x - mu) / sigma),
                                   rtol=1e-4, atol=1e-4)


def pwoa_resnet18_forward(model, x):
    """PwoA's (HBaR's) ResNet-18 forward with its names: raw inputs, average pool 4."""
    out = F.relu(model.bn1(model.conv1(x)))
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            y = F.relu(block.bn1(block.conv1(out)))
            y = block.bn2(block.conv2(y))
            out = F.relu(y + block.shortcut(out))
    return model.linear(F.avg_pool2d(out, 4).flatten(1))


def test_pwoa_resnet18_and_lenet3_checkpoints(tmp_path):
    torch.manual_seed(0)
    theirs = randomise_batchnorm(get_model("resnet18"))
    state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("normalize.")}  # PwoA has none
    torch.save(state, tmp_path / "hbar.pt")
    ours = load_pretrained("resnet18", str(tmp_path / "hbar.pt"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), pwoa_resnet18_forward(theirs, x), rtol=1e-4, atol=1e-4)

    lenet = get_model("lenet3", 10, 1)
    torch.save({"model": lenet.state_dict()}, tmp_path / "lenet3.pt")
    loaded = load_pretrained("lenet3", str(tmp_path / "lenet3.pt"), in_channels=1)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        h = F.max_pool2d(F.relu(lenet.conv1(x)), 2, 2)
        h = F.max_pool2d(F.relu(lenet.conv2(h)), 2, 2)
        reference = F.log_softmax(lenet.fc2(F.relu(lenet.fc1(h.flatten(1)))), dim=1)  # PwoA's output
        torch.testing.assert_close(F.log_softmax(loaded(x), dim=1), reference)


def test_fastprune_state_dicts_load_as_they_are(tmp_path):
    torch.manual_seed(0)
    model = randomise_batchnorm(get_model("wrn-28-4"))
    torch.save(model.state_dict(), tmp_path / "own.pt")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained("wrn-28-4", str(tmp_path / "own.pt"))(x), model(x))


def test_mismatches_are_named(tmp_path):
    torch.save(TradesWideResNet(28, 4).state_dict(), tmp_path / "wrn.pt")
    with pytest.raises(ValueError, match="does not fit --model resnet18: missing"):
        load_pretrained("resnet18", str(tmp_path / "wrn.pt"))
    with pytest.raises(ValueError, match="shapes differ for .*linear.weight"):
        load_pretrained("wrn-28-4", str(tmp_path / "wrn.pt"), num_classes=100)
    torch.save({"features.0.weight": torch.zeros(2), "features.0.popup_scores": torch.zeros(2)}, tmp_path / "h.pt")
    with pytest.raises(ValueError, match="HYDRA score checkpoint"):
        load_pretrained("vgg16", str(tmp_path / "h.pt"))
    torch.save({"epoch": 3, "acc": 0.5}, tmp_path / "meta.pt")
    with pytest.raises(ValueError, match="holds no state_dict"):
        load_pretrained("vgg16", str(tmp_path / "meta.pt"))
    with pytest.raises(FileNotFoundError):
        load_pretrained("vgg16", str(tmp_path / "absent.pt"))


def getsubnet_mask(scores, k):
    """HYDRA's GetSubnet, as its code writes it: sort |scores|, zero the lowest int((1 - k) n)."""
    out = scores.abs().clone()
    _, idx = out.flatten().sort()
    j = int((1 - k) * out.numel())
    flat = out.flatten()
    flat[idx[:j]] = 0
    flat[idx[j:]] = 1
    return flat.view_as(scores)


def test_hydra_score_checkpoint(tmp_path):
    """HYDRA's VGG16 with popup_scores: the masks are GetSubnet's at k = 1 - sparsity, folded into the
    weights, and apply_masks turns the layers into fixed-mask layers computing the same function."""
    from fastprune.nn import MaskedConv2d, apply_masks, sparsity_report

    torch.manual_seed(0)
    theirs = randomise_batchnorm(get_model("vgg16", normalize=None))
    state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("normalize.")}
    layers = [n for n, m in theirs.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    for name in layers:
        state[f"{name}.popup_scores"] = torch.randn_like(state[f"{name}.weight"])
    torch.save({"state_dict": state, "epoch": 20}, tmp_path / "hydra.pt")
    with pytest.raises(ValueError, match="sparsity"):
        load_pretrained("vgg16", str(tmp_path / "hydra.pt"))
    ours = load_pretrained("vgg16", str(tmp_path / "hydra.pt"), sparsity=0.9)
    expected = {n: getsubnet_mask(state[f"{n}.popup_scores"], 0.1) for n in layers}
    assert set(ours.hydra_masks) == set(layers)
    for name in layers:
        assert torch.equal(ours.hydra_masks[name], expected[name]), name
    with torch.no_grad():
        modules = dict(theirs.named_modules())
        for name in layers:
            modules[name].weight.mul_(expected[name])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
        apply_masks(ours, ours.hydra_masks)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
    assert isinstance(ours.features[0], MaskedConv2d) and ours.features[0].source == "fixed"
    assert abs(sparsity_report(ours)["sparsity"] - 0.9) < 1e-3


class _Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


def hydra_small_reference():
    """HYDRA's small CIFAR CNN written as its source writes it (layers by index, its own Flatten)."""
    return nn.Sequential(nn.Conv2d(3, 16, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2, padding=1),
                         nn.ReLU(), _Flatten(), nn.Linear(32 * 8 * 8, 100), nn.ReLU(), nn.Linear(100, 10))


def test_hydra_small_cnn_score_checkpoint_loads_into_hydra_cnn_small(tmp_path):
    torch.manual_seed(1)
    theirs = hydra_small_reference()
    state = {f"module.{k}": v for k, v in theirs.state_dict().items()}  # DataParallel's prefix
    for index in ("0", "2", "5", "7"):
        state[f"module.{index}.popup_scores"] = torch.randn_like(state[f"module.{index}.weight"])
    torch.save({"state_dict": state}, tmp_path / "hydra-small.pt")
    ours = load_pretrained("hydra-cnn-small", str(tmp_path / "hydra-small.pt"), sparsity=0.95)
    with torch.no_grad():
        for index in ("0", "2", "5", "7"):
            theirs.get_submodule(index).weight.mul_(getsubnet_mask(state[f"module.{index}.popup_scores"], 0.05))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    assert sorted(ours.hydra_masks) == ["0", "2", "5", "7"]
    large = get_model("hydra-cnn-large")
    assert [k for k in large.state_dict() if k.endswith("weight")] == [f"{i}.weight" for i in (0, 2, 4, 6, 9, 11, 13)]
    assert large(torch.rand(2, 3, 32, 32)).shape == (2, 10)


class KuangliuBlock(nn.Module):
    """The CIFAR ResNet BasicBlock HYDRA's resnet18 uses (kuangliu's pytorch-cifar names and forward)."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class KuangliuResNet18(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64)
        planes, layers = 64, []
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(nn.Sequential(KuangliuBlock(planes, width, stride), KuangliuBlock(width, width, 1)))
            planes = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.avg_pool2d(out, 4).flatten(1))


@pytest.mark.parametrize("arch,reference", [("resnet18", KuangliuResNet18), ("wrn-28-4", TradesWideResNet)])
def test_hydra_score_checkpoints_of_its_resnet18_and_wrn_28_4(arch, reference, tmp_path):
    """HYDRA's resnet18 (kuangliu's names) and wrn_28_4 (TRADES' names, sub_block1 included), their
    SubnetConv/SubnetLinear layers holding popup_scores: the zoo's models load them, masks folded."""
    torch.manual_seed(2)
    theirs = randomise_batchnorm(reference())
    state = dict(theirs.state_dict())
    layers = [n for n, m in theirs.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    for name in layers:
        state[f"{name}.popup_scores"] = torch.randn_like(state[f"{name}.weight"])
    torch.save({"state_dict": state}, tmp_path / "hydra.pt")
    ours = load_pretrained(arch, str(tmp_path / "hydra.pt"), sparsity=0.9)
    with torch.no_grad():
        for name in layers:
            theirs.get_submodule(name).weight.mul_(getsubnet_mask(state[f"{name}.popup_scores"], 0.1))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
    used = [n for n in layers if not n.startswith("sub_block1.")]
    assert len(ours.hydra_masks) == len(used)
