"""Concurrent micro-batches on one OpenMP team, the network cut for a join, the join itself, and joined
configs computing the model (fastprune/nn/sparse/micro_batches.py)."""
import threading

import pytest
import torch

from fastprune import backends
from fastprune.models import get_model
from fastprune.nn import SparseConv2d, prune_model, sparsify
from fastprune.nn.sparse.micro_batches import join_candidates, join_micro_batches, run_team, split_network
from fastprune.nn.sparse.model import SparseModel, make_config
from fastprune.ops.sparse import generated_supported

needs_extension = pytest.mark.skipif(not backends.extension_info()["cpp"], reason="run_team is in the C++ extension")


def _sparse(name: str, seed: int) -> tuple[torch.nn.Module, SparseModel]:
    torch.manual_seed(seed)
    model = prune_model(get_model(name, 10, 3).eval(), 0.9, method="magnitude")
    for m in model.modules():  # BatchNorm statistics that are not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model, sparsify(model, benchmark=False)


class _Threads:
    def __init__(self, n):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


@needs_extension
def test_run_team_runs_each_call_on_its_own_thread_of_one_team_serially_and_in_order():
    caller = threading.get_ident()
    started = threading.Barrier(2, timeout=30)  # both calls must be running at once

    def call(i):
        started.wait()
        return i, threading.get_ident(), torch.get_num_threads(), float(torch.ones(1000).sum())

    with _Threads(2):
        got = run_team([lambda: call(0), lambda: call(1)])
    assert [g[0] for g in got] == [0, 1]
    assert got[0][1] == caller and got[1][1] != caller  # thread 0 is the caller
    assert [g[2] for g in got] == [1, 1]  # each thread's torch ops run on it alone
    assert [g[3] for g in got] == [1000.0, 1000.0]
    assert torch.get_num_threads() == 2  # the caller's own setting is untouched afterwards
    assert run_team([]) == []
    with pytest.raises(TypeError, match=r"calls\[1\] is not callable"):
        run_team([lambda: 1, 2])


@needs_extension
def test_run_team_raises_the_first_error_after_every_call_finished():
    finished = []

    def slow():
        for _ in range(50):
            torch.ones(100_000).sum()
        finished.append("slow")
        return "slow"

    def fail():
        raise ValueError("one call failed")

    with _Threads(2), pytest.raises(ValueError, match="one call failed"):
        run_team([fail, slow])
    assert finished == ["slow"]


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_the_network_is_cut_only_where_one_value_flows_and_the_parts_compute_it(name):
    _, sparse = _sparse(name, 0)
    net, x = sparse.net, torch.rand(3, 3, 32, 32)
    convs = [n for n, m in net.named_modules() if isinstance(m, SparseConv2d)]
    with torch.no_grad():
        want = net(x)
        cuts = [layer for layer in convs if split_network(net, layer) is not None]
        for layer in cuts:
            prefix, suffix = split_network(net, layer)
            torch.testing.assert_close(suffix(prefix(x)), want, atol=0, rtol=0)
    if name == "vgg16":  # a chain: before every conv
        assert cuts == convs
    else:  # at a block's input (its first conv's and its shortcut's), never inside: the residual needs it
        assert "layer2.0.conv1" in cuts and "layer2.0.shortcut.0" in cuts and "layer4.1.conv1" in cuts
        assert not any(c.endswith("conv2") for c in cuts)
    assert split_network(net, "no.such.layer") is None
    candidates = join_candidates(net, x)
    assert len(candidates) == 3 and all(c in cuts for c in candidates)
    # one per map size, the last three: the smallest maps
    assert candidates == (["features.14", "features.24", "features.34"] if name == "vgg16"
                          else ["layer2.1.conv1", "layer3.1.conv1", "layer4.1.conv1"])


def test_join_keeps_the_padded_batch_innermost_layout_and_the_order():
    def part(n, pad):
        plane = 5 * 6 * n + pad
        storage = torch.randn(7 * plane)
        return torch.as_strided(storage, (n, 7, 5, 6), (1, plane, 6 * n, n))

    parts = [part(16, 16), part(16, 16), part(8, 16)]
    joined = join_micro_batches(parts)
    assert joined.shape == (40, 7, 5, 6) and joined.stride() == (1, 5 * 6 * 40 + 16, 6 * 40, 40)
    torch.testing.assert_close(joined, torch.cat(parts), atol=0, rtol=0)
    contiguous = [torch.randn(4, 7, 5, 6), torch.randn(2, 7, 5, 6)]
    assert join_micro_batches(contiguous).is_contiguous()
    torch.testing.assert_close(join_micro_batches(contiguous), torch.cat(contiguous), atol=0, rtol=0)
    mixed = [part(16, 16), part(16, 0)]  # planes padded differently: no common layout to keep
    torch.testing.assert_close(join_micro_batches(mixed), torch.cat(mixed), atol=0, rtol=0)


@needs_extension
@pytest.mark.parametrize("name, batch", [("vgg16", 64), ("resnet18", 48), ("resnet18", 40)])
def test_joined_configs_compute_the_model_with_the_late_layers_on_the_whole_batch(name, batch):
    model, sparse = _sparse(name, 1)
    x = torch.rand(batch, 3, 32, 32)
    choice = "generated" if generated_supported() else "tiled"
    layers = {n: choice if isinstance(m, SparseConv2d) else "csr" for n, m in sparse.sparse_layers().items()}
    plain = make_config("batch_innermost", 16, layers, "sparse")
    layers_ = sparse.sparse_layers()
    with torch.no_grad():
        want = model(x)
        unjoined = sparse.run(x, plain)
        for join_at in join_candidates(sparse.net, x):
            config = make_config("batch_innermost", 16, layers, "sparse", join_at)
            seen = []
            hook = layers_[join_at].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
            try:
                with _Threads(2):
                    got = sparse.run(x, config)
                with _Threads(1):  # one thread: no concurrent micro-batches, so no join either
                    one_thread = sparse.run(x, config)
            finally:
                hook.remove()
            torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
            torch.testing.assert_close(got, unjoined, atol=1e-6 * want.abs().max().item(), rtol=1e-6)
            torch.testing.assert_close(one_thread, got, atol=1e-6 * want.abs().max().item(), rtol=1e-6)
            # with two threads the layer ran once on the whole batch; with one, once a micro-batch
            assert seen == [batch] + [16] * (batch // 16) + ([batch % 16] if batch % 16 else [])


def test_a_plan_joining_at_something_but_a_sparse_conv_is_refused():
    _, sparse = _sparse("vgg16", 2)
    layers = {n: "tiled" if isinstance(m, SparseConv2d) else "csr" for n, m in sparse.sparse_layers().items()}
    for bad in ("classifier.0", "features", 3):
        plan = {"untuned": "tune", "devices": {"cpu": {"64-255": {**make_config("batch_innermost", 16, layers, "sparse"),
                                                                   "join_at": bad}}}}
        with pytest.raises(ValueError, match="join_at"):
            SparseModel(sparse.net, plan)
