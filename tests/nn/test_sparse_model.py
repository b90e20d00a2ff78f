"""SparseModel and sparsify: one network whatever timing picks, a plan per device and batch-size
bucket, save/load of every choice, torch.compile across buckets, attacks on sparse models."""
import os
import random

import pytest
import torch
from torch import nn

from fastprune.models import get_model
from fastprune.nn import SparseConv2d, SparseLinear, SparseModel, load_sparse, prune_model, save_sparse, sparsify
from fastprune.nn.sparse import add_relu, bucket_of, inference_graph
from fastprune.nn.sparse.micro_batches import join_candidates
from fastprune.nn.sparse.model import device_key, make_config
from fastprune.nn.sparse.tuner import build_sparse_network


def _pruned(name: str, sparsity: float = 0.9, device="cpu", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    channels = 1 if name == "cnn-small" else 3
    model = get_model(name, 10, channels).to(device).eval()
    for m in model.modules():  # BatchNorm statistics that are not the identity: folding mistakes show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return prune_model(model, sparsity, method="magnitude")


def _input(name: str, batch: int, device="cpu") -> torch.Tensor:
    return torch.rand(batch, 1, 8, 8, device=device) if name == "cnn-small" else torch.rand(batch, 3, 32, 32,
                                                                                              device=device)


def _close(got, want):
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "vgg16", "cnn-small"])
def test_sparsify_equals_the_masked_model_tuned_untuned_and_static(name, device):
    model = _pruned(name, device=device)
    x = _input(name, 3, device)
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    tuned = sparsify(model, x, batch_sizes=(3,), repeats=1)
    untuned = sparsify(model, repeats=1)          # tunes a bucket on its first call
    static = sparsify(model, benchmark=False)     # every layer sparse, untimed
    assert not untuned.tuned(device) and not static.tuned(device)
    with torch.no_grad():
        want = model(x)
        for sparse in (tuned, untuned, static):
            _close(sparse(x), want)
    assert set(untuned.tuned(device)) == {"2-7"} and not static.tuned(device)
    # the same modules and state_dict keys whatever was timed: every 90% layer holds CSR weights
    assert tuned.state_dict().keys() == untuned.state_dict().keys() == static.state_dict().keys()
    assert len(tuned.sparse_layers()) == layers
    assert not any(type(m).__name__.startswith("Masked") for m in tuned.modules())
    if name == "vgg16":  # every conv -> ReLU (-> pool) pair fused, whatever algorithm runs it
        assert all(m.epilogue > 0 for m in static.sparse_layers().values() if isinstance(m, SparseConv2d))
    # from batch 8 on, the untimed CPU config runs every equal-stride conv on the tiled algorithm
    big = _input(name, 9, device)
    choices = static.config_for(big)["layers"]
    convs = {n: m for n, m in static.sparse_layers().items() if isinstance(m, SparseConv2d)}
    expected = "tiled" if device.type == "cpu" else "auto"
    assert all(choices[n] == (expected if m.stride[0] == m.stride[1] else "auto") for n, m in convs.items())
    assert set(static.config_for(x)["layers"][n] for n in convs) == {"auto"}
    with torch.no_grad():
        _close(static(big), model(big))


def _configs(sparse: SparseModel, seed: int) -> dict:
    """Every kind of config the tuner can store: all dense; each CPU algorithm in the layouts it
    runs in; random per-layer mixes in random layouts; micro-batches."""
    layers = sparse.sparse_layers()
    rng = random.Random(seed)

    def every(choice_conv, choice_linear="csr"):
        return {n: choice_conv if isinstance(m, SparseConv2d) else choice_linear for n, m in layers.items()}

    configs = {"dense": make_config("contiguous", None, every("dense", "dense"), "dense"),
               "dense, channels_last": make_config("channels_last", None, every("dense", "dense"), "dense")}
    for layout in ("contiguous", "channels_last"):
        for algo in ("auto", "padded", "direct"):
            configs[f"{algo}, {layout}"] = make_config(layout, None, every(algo), "sparse")
    configs["batch innermost"] = make_config("batch_innermost", None, every("batch_innermost"), "sparse")
    for i in range(3):
        mixed = {n: rng.choice(m.choices[:-1] if isinstance(m, SparseLinear) else m.choices)
                 for n, m in layers.items()}
        configs[f"mixed {i}"] = make_config(rng.choice(("contiguous", "channels_last", "batch_innermost")),
                                            rng.choice((None, 4)), mixed, "sparse")
    configs["batch innermost, micro-batches of 4"] = make_config("batch_innermost", 4, every("batch_innermost"),
                                                                 "sparse")
    join_at = join_candidates(sparse.net, torch.rand(1, 3, 32, 32))[0]
    configs[f"tiled, micro-batches of 4 joined at {join_at}"] = make_config("batch_innermost", 4, every("tiled"),
                                                                           "sparse", join_at)
    return configs


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_every_choice_layout_and_micro_batch_computes_the_model_and_reloads_exactly(name, tmp_path):
    model = _pruned(name, 0.95, seed=1)
    sparse = sparsify(model, benchmark=False)
    x = _input(name, 9)
    with torch.no_grad():
        want = model(x)
    for key, config in _configs(sparse, seed=len(name)).items():
        with torch.no_grad():
            got = sparse.run(x, config)
        _close(got, want)
        # A plan holding this config for x's bucket: the file keeps it, the reloaded model runs it.
        sparse.plan["devices"] = {device_key(x.device): {bucket_of(9): config}}
        sparse._active = None
        path = tmp_path / "m.pt"
        save_sparse(sparse, str(path))
        loaded = load_sparse(str(path))
        assert loaded.plan == sparse.plan, key
        assert loaded.state_dict().keys() == sparse.state_dict().keys(), key
        with torch.no_grad():
            assert torch.equal(loaded(x), sparse(x)), key
            assert torch.equal(loaded(x), got), key


def test_the_plan_is_chosen_by_batch_size_and_untuned_buckets_follow_untuned():
    assert [bucket_of(b) for b in (0, 1, 2, 7, 8, 63, 64, 255, 256, 10**6)] == [
        "1", "1", "2-7", "2-7", "8-63", "8-63", "64-255", "64-255", "256+", "256+"]
    model = _pruned("cnn-small")
    x = _input("cnn-small", 40)
    sparse = sparsify(model, x, batch_sizes=(16,), untuned="dense", repeats=1)
    cpu = torch.device("cpu")
    assert set(sparse.tuned(cpu)) == {"8-63"} and sparse.tuned(cpu)["8-63"]["tuned_on"] == 16
    assert sparse.config_for(x) is sparse.tuned(cpu)["8-63"]  # 40 is in 16's bucket
    assert set(sparse.config_for(x[:1])["layers"].values()) == {"dense"}  # untuned: dense, nothing timed
    with torch.no_grad():
        _close(sparse(x[:1]), model(x[:1]))
    assert set(sparse.tuned(cpu)) == {"8-63"}
    sparse.untuned = "tune"
    with torch.no_grad():
        _close(sparse(x[:1]), model(x[:1]))
    assert set(sparse.tuned(cpu)) == {"1", "8-63"}
    with pytest.raises(ValueError, match="share the bucket"):
        sparsify(model, x, batch_sizes=(2, 5))
    with pytest.raises(ValueError, match="untuned"):
        sparsify(model, untuned="fastest")
    with pytest.raises(ValueError, match="batch_sizes"):
        sparsify(model, x, batch_sizes=(0,))


def test_the_tuner_keeps_dense_unless_sparse_wins_by_three_percent(monkeypatch):
    # The rule behind "never slower than dense", checked with planted timings (no real clock).
    from fastprune.nn.sparse import tuner

    model = _pruned("cnn-small")
    x = _input("cnn-small", 2)
    for sparse_factor, want_kind in ((1.10, "dense"), (0.98, "dense"), (0.90, "sparse")):
        def planted(fns, device, repeats, warmup, factor=sparse_factor):
            for fn in fns.values():
                fn()
            return {k: (factor if k.startswith("sparse") else 1.0) * (1.01 if "channels_last" in k else 1.0)
                    for k in fns}

        monkeypatch.setattr(tuner, "interleaved_fastest", planted)
        sparse = sparsify(model, x, batch_sizes=(2,), repeats=1)
        config = sparse.tuned(x.device)["2-7"]
        assert config["kind"] == want_kind, sparse_factor
        assert config["choice"] == ("dense, contiguous" if want_kind == "dense" else "sparse, contiguous")


def test_layer_choices_are_timed_and_kept_only_when_faster(monkeypatch):
    from fastprune.nn.sparse import tuner

    model = _pruned("cnn-small")
    x = _input("cnn-small", 2)
    sparse = sparsify(model, benchmark=False)
    convs = {n for n, m in sparse.sparse_layers().items() if isinstance(m, SparseConv2d)}
    for fast, seconds, want in (("padded", 0.5, "padded"), ("padded", 0.98, "dense"), ("dense", 0.5, "dense")):
        def planted(layer, choice, args, repeats, fast=fast, seconds=seconds):
            layer.choice = choice
            return seconds if choice == fast else 1.0

        monkeypatch.setattr(tuner, "_time_choice", planted)
        choices = tuner.tune_layers(sparse, x, "contiguous", repeats=1)
        assert {choices[n] for n in convs} == {want}, (fast, seconds)


def test_loading_on_another_device_or_with_retune_tunes_again(tmp_path):
    model = _pruned("cnn-small")
    x = _input("cnn-small", 3)
    sparse = sparsify(model, x, batch_sizes=(3,), repeats=1)
    path = str(tmp_path / "m.sparse.pt")
    save_sparse(sparse, path)
    assert set(load_sparse(path).tuned(x.device)) == {"2-7"}
    assert not load_sparse(path, retune=True).tuned(x.device)
    threads = torch.get_num_threads()
    try:  # another thread count is another device for the plan
        torch.set_num_threads(threads + 1)
        loaded = load_sparse(path)
        assert not loaded.tuned(x.device)
        with torch.no_grad():
            _close(loaded(x), model(x))
        assert set(loaded.tuned(x.device)) == {"2-7"}
    finally:
        torch.set_num_threads(threads)
    assert load_sparse(path, untuned="dense").untuned == "dense"
    with pytest.raises(ValueError, match="untuned"):
        load_sparse(path, untuned="sometimes")


def test_a_file_with_a_bad_plan_or_tensors_is_refused(tmp_path):
    model = _pruned("cnn-small")
    sparse = sparsify(model, _input("cnn-small", 3), batch_sizes=(3,), repeats=1)
    path = str(tmp_path / "m.pt")
    save_sparse(sparse, path)
    good = torch.load(path, weights_only=True)
    bucket = next(iter(good["plan"]["devices"].values()))["2-7"]
    layer = next(iter(bucket["layers"]))
    for edit, message in ((lambda o: bucket["layers"].__setitem__(layer, "bogus"), "no choice"),
                          (lambda o: bucket["layers"].pop(layer), "do not match"),
                          (lambda o: bucket.__setitem__("layout", "diagonal"), "layout"),
                          (lambda o: o["state_dict"].pop(next(iter(o["state_dict"]))), "inconsistent")):
        obj = torch.load(path, weights_only=True)
        bucket = next(iter(obj["plan"]["devices"].values()))["2-7"]
        edit(obj)
        torch.save(obj, tmp_path / "bad.pt")
        with pytest.raises(ValueError, match=message):
            load_sparse(str(tmp_path / "bad.pt"))
    assert good["version"] == 2


def test_torch_compile_of_a_sparse_model_follows_the_plan_across_buckets():
    model = _pruned("cnn-small")
    x = _input("cnn-small", 16)
    sparse = sparsify(model, x, batch_sizes=(1, 16), repeats=1, batch_innermost=True, untuned="sparse")
    compiled = torch.compile(sparse, backend="inductor")
    with torch.no_grad():
        for batch in (1, 16, 3):
            _close(compiled(x[:batch]), model(x[:batch]))


def test_save_load_round_trip_and_size(tmp_path):
    model = _pruned("resnet18", 0.99)
    sparse = sparsify(model, benchmark=False)
    path = tmp_path / "sparse.pt"
    save_sparse(sparse, str(path))
    loaded = load_sparse(str(path))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), sparse(x))
    dense_bytes = sum(p.numel() * 4 for p in get_model("resnet18").parameters())
    assert os.path.getsize(path) < 0.05 * dense_bytes, "a 99% sparse model must store about 1% of the weights"
    with pytest.raises(FileNotFoundError):
        load_sparse(str(tmp_path / "missing.pt"))
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="save_sparse"):
        load_sparse(str(tmp_path / "other.pt"))


def test_save_sparse_needs_a_sparsify_result_of_a_zoo_model(tmp_path):
    with pytest.raises(ValueError, match="sparsify"):
        save_sparse(nn.Linear(3, 2), str(tmp_path / "a.pt"))
    plain = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    with pytest.raises(ValueError, match="get_model"):
        save_sparse(sparsify(plain), str(tmp_path / "b.pt"))


def test_residual_add_and_relu_fuse_into_one_op():
    from fastprune.nn.sparse.passes import _fuse_add_relu

    torch.manual_seed(0)
    model = get_model("resnet18", 10, 3).eval()
    traced = torch.fx.symbolic_trace(model)
    _fuse_add_relu(traced)
    traced.recompile()
    fused = [n for n in traced.graph.nodes if n.target is add_relu]
    assert len(fused) == 8  # one per residual block
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), atol=1e-6, rtol=1e-5)


def test_resnet_fuses_every_residual_into_a_conv_whatever_its_algorithm():
    model = _pruned("resnet18")
    net, _ = build_sparse_network(model, 0.5)
    assert sum(m.epilogue == 3 for m in net.modules() if isinstance(m, SparseConv2d)) == 8  # one per block
    assert not any(n.target is add_relu for n in net.graph.nodes)
    sparse = SparseModel(net)
    x = torch.rand(9, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        for key, config in _configs(sparse, seed=3).items():
            _close(sparse.run(x, config), want)


def test_sparsify_tries_the_batch_innermost_layout_and_micro_batches_on_cpu_batches():
    model = _pruned("cnn-small")
    x = _input("cnn-small", 70)
    sparse = sparsify(model, x, batch_sizes=(70, 2), repeats=1)
    seconds = sparse.tuned(x.device)["64-255"]["seconds"]
    assert "sparse, batch_innermost, micro-batches of 64" in seconds  # from 64 images on: sparse runs in slices
    assert not any(k.startswith("sparse") and "micro" not in k for k in seconds)
    assert {"sparse, batch_innermost, micro-batches of 32", "sparse, batch_innermost, micro-batches of 16"} <= set(
        seconds)  # and in halves and quarters of that
    assert sparse.tuned(x.device)["64-255"]["micro_batch"] in (None, 64, 32, 16)
    joined = {k for k in seconds if "joined at" in k}  # and joined into one batch before a late layer
    assert joined and all(k.startswith("sparse, batch_innermost, micro-batches of ") for k in joined)
    small = sparse.tuned(x.device)["2-7"]["seconds"]  # a batch of 2 does not fill a vector register
    assert not any("batch_innermost" in k for k in small)
    forced = sparsify(model, x, batch_sizes=(70,), repeats=1, batch_innermost=True, channels_last=False)
    assert {k.split(",")[1].strip() for k in forced.tuned(x.device)["64-255"]["seconds"]} == {
        "contiguous", "batch_innermost"}
    with torch.no_grad():
        for result in (sparse, forced):
            for batch in (70, 2):
                _close(result(x[:batch]), model(x[:batch]))
    with pytest.raises(ValueError, match="batch_innermost"):
        sparsify(model, x, batch_innermost="yes")


def test_an_attack_runs_on_a_sparsified_model(device):
    from fastprune.attacks import PGD

    model = _pruned("resnet18", 0.99, device=device)
    x, y = torch.rand(8, 3, 32, 32, device=device), torch.randint(0, 10, (8,), device=device)
    attack = dict(eps=8 / 255, alpha=2 / 255, steps=2, random_start=False)
    want = PGD(model, **attack)(x, y)
    static = sparsify(model, benchmark=False)  # every layer sparse, residuals fused into convs
    assert sum(isinstance(m, SparseConv2d) for m in static.modules()) == 20
    got = PGD(static, **attack)(x, y)
    # The same steps, except where a gradient entry is within rounding of zero and its sign flips
    # (one entry of 24576 on an H200): at most 0.1% of the entries may differ, by at most the budget.
    differ = (got - want).abs() > 1e-5
    assert differ.float().mean() <= 1e-3
    assert (got - want).abs().max() <= 2 * attack["eps"] + 1e-6
    for innermost in (False, True) if device.type == "cpu" else (False,):
        sparse = sparsify(model, x, batch_sizes=(8,), repeats=1, channels_last=False, batch_innermost=innermost)
        torch.testing.assert_close(PGD(sparse, **attack)(x, y), want, atol=1e-5, rtol=0)


def test_the_backend_chosen_at_a_network_call_holds_for_all_its_layers(monkeypatch):
    # SparseModel resolves the CPU sparse convs' backend once per call (not per layer): a backend
    # forced around the call still reaches every layer, and nothing of it outlives the call.
    import fastprune.ops.sparse as sparse_ops
    from fastprune import use_backend

    model = _pruned("resnet18")
    x = _input("resnet18", 8)
    sparse = sparsify(model, benchmark=False)  # untuned "sparse": batch 8 puts the convs on the tiled kernel
    calls = []
    real = sparse_ops._conv_cpp
    monkeypatch.setattr(sparse_ops, "_conv_cpp", lambda *args, **kw: calls.append(1) or real(*args, **kw))
    real_kernel_call = inference_graph._kernel_call  # the convs the inference graph calls directly

    def counted_kernel_call(layer, algo):
        fn = real_kernel_call(layer, algo)

        def counted(*args):
            calls.append(1)
            return fn(*args)

        return counted

    monkeypatch.setattr(inference_graph, "_kernel_call", counted_kernel_call)
    with torch.no_grad():
        want = model(x)
        _close(sparse(x), want)
        assert len(calls) >= 20  # every sparse conv on the C++ kernels, through its layer or directly
        calls.clear()
        with use_backend("reference"):
            _close(sparse(x), want)
        assert not calls
    assert sparse_ops._network_cpu_backend.get() is None


def _sparse_in_micro_batches(seed: int, micro: int):
    """A ResNet-18 at 90% sparsified (untuned) and a config running it tiled in micro-batches of micro."""
    model = _pruned("resnet18", 0.9, seed=seed)
    sparse = sparsify(model, benchmark=False)
    layers = {n: "tiled" if isinstance(m, SparseConv2d) else "csr" for n, m in sparse.sparse_layers().items()}
    return model, sparse, make_config("batch_innermost", micro, layers, "sparse")


needs_extension = pytest.mark.skipif(not __import__("fastprune").backends.extension_info()["cpp"],
                                     reason="concurrent micro-batches need the C++ extension")


@needs_extension
@pytest.mark.parametrize("batch, micro, threads", [(64, 16, 2), (48, 16, 2), (40, 16, 2), (96, 16, 3)])
def test_micro_batches_run_concurrently_one_thread_each_and_give_the_same_outputs(batch, micro, threads):
    # Whole rounds of micro-batches on one team of threads (the calling one and its OpenMP threads: a
    # contiguous run of them a thread), the rest on the calling thread; the outputs in the batch's order,
    # equal to one micro-batch at a time.
    import threading

    model, sparse, config = _sparse_in_micro_batches(3, micro)
    x = _input("resnet18", batch)
    seen = []
    hook = sparse.net.register_forward_pre_hook(
        lambda mod, args: seen.append((threading.get_ident(), args[0].shape[0], args[0][0, 0, 0, 0].item())))
    strides = []  # of each micro-batch as the net gets it
    stride_hook = sparse.net.register_forward_pre_hook(lambda mod, args: strides.append(args[0].stride()))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            want = model(x)
            sparse.parallel_micro_batches = False
            one_at_a_time = sparse.run(x, config)
            assert all(ident == threading.get_ident() for ident, _, _ in seen)
            seen.clear()
            strides.clear()
            sparse.parallel_micro_batches = True
            got = sparse.run(x, config)
            concurrent_strides = list(strides)
        with torch.inference_mode():
            in_inference_mode = sparse.run(x, config)
    finally:
        torch.set_num_threads(before)
        hook.remove()
        stride_hook.remove()
    _close(got, want)
    torch.testing.assert_close(got, one_at_a_time, atol=1e-6 * want.abs().max().item(), rtol=1e-6)
    torch.testing.assert_close(in_inference_mode, got, atol=0, rtol=0)
    parts = -(-batch // micro)
    per_thread = {}
    for ident, _, _ in seen[:parts]:
        per_thread[ident] = per_thread.get(ident, 0) + 1
    per, rest = parts // threads, parts % threads
    assert len(per_thread) == threads and threading.get_ident() in per_thread
    assert per_thread.pop(threading.get_ident()) == per + rest and set(per_thread.values()) == {per}
    # every micro-batch ran once, on the slice it was given
    starts = sorted(first for _, _, first in seen[:parts])
    assert starts == sorted(x[i, 0, 0, 0].item() for i in range(0, batch, micro))
    # each micro-batch put in the layout on its own (by the thread that runs it), not cut from the
    # whole batch's
    n_of = sorted(b for _, b, _ in seen[:parts])
    assert sorted((s[0], s[3]) for s in concurrent_strides) == [(1, b) for b in n_of]


@needs_extension
def test_micro_batches_stay_on_the_calling_thread_under_autograd_or_with_few_of_them():
    import threading

    _, sparse, config = _sparse_in_micro_batches(4, 16)
    names = []
    hook = sparse.net.register_forward_pre_hook(lambda mod, args: names.append(threading.get_ident()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x = _input("resnet18", 32).requires_grad_()
        out = sparse.run(x, config)  # autograd on: grad mode is per thread, the workers would lose it
        out.sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        with torch.no_grad():
            sparse.run(_input("resnet18", 16), config)  # one micro-batch for two threads
            torch.set_num_threads(4)
            sparse.run(_input("resnet18", 48), config)  # three micro-batches for four threads
    finally:
        torch.set_num_threads(before)
        hook.remove()
    assert names and all(name == threading.get_ident() for name in names)


@needs_extension
def test_an_error_in_a_concurrent_micro_batch_reaches_the_caller():
    _, sparse, config = _sparse_in_micro_batches(5, 16)
    calls = []

    def fail_once(mod, args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a micro-batch failed")

    hook = sparse.net.register_forward_pre_hook(fail_once)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="a micro-batch failed"):
            sparse.run(_input("resnet18", 64), config)
    finally:
        torch.set_num_threads(before)
        hook.remove()


def _with_module_path(sparse):
    """sparse's output with every layer called as a module: a forward hook on the network turns the
    inference graph off (hooks must see every call)."""
    hook = sparse.net.register_forward_pre_hook(lambda mod, args: None)
    return hook


@pytest.mark.parametrize("name,choice,batch", [("resnet18", "tiled", 1), ("resnet18", "tiled", 64),
                                               ("vgg16", "tiled", 1), ("resnet18", "generated", 32),
                                               ("resnet18", "batch_innermost", 16)])
def test_inference_graph_calls_the_kernels_of_convs_fed_by_convs_and_changes_no_output(name, choice, batch,
                                                                                          monkeypatch):
    # CPU inference runs the network's inference graph: each sparse conv whose inputs are other sparse
    # convs' outputs (not the first, fed by the input's normalisation; not the pooled ones) calls its
    # kernel without its module, and ResNet's head (global average pooling, flatten, the linear) is one
    # call. The outputs are the module path's (the convs bit for bit: the same kernels on the same
    # arguments; the head to rounding), at batch 1 and in concurrent micro-batches; the layers' weights
    # are read at each call (edited in place after the graph was built, the output follows).
    from fastprune.ops.sparse import generated_supported

    if choice == "generated" and not generated_supported():
        pytest.skip("the generated kernel needs AVX-512 and executable memory")
    model = _pruned(name, 0.9, seed=batch)
    sparse = sparsify(model, benchmark=False)
    layers = {n: choice if isinstance(m, SparseConv2d) else m.choices[1] for n, m in sparse.sparse_layers().items()}
    config = make_config("batch_innermost" if choice == "batch_innermost" else "contiguous",
                         16 if batch > 16 else None, layers, "sparse")
    x = _input(name, batch)
    calls, linear_calls = [], []
    real_forward, real_linear = SparseConv2d.forward, SparseLinear.forward
    monkeypatch.setattr(SparseConv2d, "forward", lambda self, *a: calls.append(1) or real_forward(self, *a))
    monkeypatch.setattr(SparseLinear, "forward", lambda self, *a: linear_calls.append(1) or real_linear(self, *a))
    convs = [m for m in sparse.sparse_layers().values() if isinstance(m, SparseConv2d)]
    linears = [m for m in sparse.sparse_layers().values() if isinstance(m, SparseLinear)]
    fed_by_input_or_pooled = 1 + sum(m.epilogue == 2 for m in convs)
    fused_head = name == "resnet18"
    with torch.no_grad():
        got = sparse.run(x, config)
        micro_batches = 1 if batch <= 16 else batch // 16
        assert len(calls) == micro_batches * fed_by_input_or_pooled, calls
        assert len(linear_calls) == (0 if fused_head else micro_batches * len(linears))
        hook = _with_module_path(sparse)
        calls.clear(), linear_calls.clear()
        want = sparse.run(x, config)
        assert len(calls) == micro_batches * len(convs)
        assert len(linear_calls) == micro_batches * len(linears)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        assert torch.equal(got, want) or fused_head
        _close(got, model(x))
        hook.remove()
        for m in convs + linears:
            m.values.mul_(-1.5)  # in place: the graph built before must read the new values
        convs[-1].values = torch.randn_like(convs[-1].values)  # and a new tensor in a layer's place
        linears[-1].values = torch.randn_like(linears[-1].values)
        got = sparse.run(x, config)
        hook = _with_module_path(sparse)
        want = sparse.run(x, config)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        assert torch.equal(got, want) or fused_head
        hook.remove()


def test_inference_graph_steps_aside_for_autograd_hooks_and_copies():
    # Under autograd, with a forward hook on a layer, and in a deep copy, the layers run as modules (a
    # copy's graph calls the copy's layers: its weights edited leave the original's outputs alone).
    import copy

    model = _pruned("resnet18", 0.9, seed=3)
    sparse = sparsify(model, benchmark=False)
    x = _input("resnet18", 1)
    with torch.no_grad():
        want = sparse(x)
    conv = [m for m in sparse.sparse_layers().values() if isinstance(m, SparseConv2d)][-1]
    seen = []
    hook = conv.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.no_grad():
        assert torch.equal(sparse(x), want)
    assert len(seen) == 1
    hook.remove()
    grads = sparse(x.clone().requires_grad_())  # autograd on: the layers' differentiable path
    assert grads.requires_grad
    copied = copy.deepcopy(sparse)
    with torch.no_grad():
        for m in copied.sparse_layers().values():
            if isinstance(m, SparseConv2d):
                m.values.zero_()
        assert not torch.equal(copied(x), want)
        assert torch.equal(sparse(x), want)
