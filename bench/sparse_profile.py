"""Where sparse CPU inference spends its time (bench/NOTES.md, "CPU sparse inference"):

  python bench/sparse_profile.py layers    per conv shape of ResNet-18 (CIFAR, batch 64): GFLOP on the
                                           non-zeros, MB moved, ms and GFLOP/s of the batch-innermost
                                           and tiled algorithms, at 90% and 99%
  python bench/sparse_profile.py untuned   sparsify(model) (no example, nothing timed) against
                                           sparsify(model, x) tuned, at batch 64, interleaved
  python bench/sparse_profile.py window    the cache's share: a 256->256 8x8 conv (batch 64, tiled)
                                           with its non-zeros packed into a few input channels (the
                                           input window stays in L1) against as many spread at random
  python bench/sparse_profile.py network --model resnet18 --sparsity 0.9
                                           each sparse conv of the tuned model, in the network: ms per
                                           batch (all its micro-batches), to set beside DeepSparse's
                                           per-layer times (`deepsparse.debug_analysis MODEL.onnx -ncores
                                           2 -b 64`, an ONNX export of the same pruned model)

Magnitude-pruned random weights, medians of repeated runs; prints markdown tables.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from fastprune.ops.sparse import ALGORITHMS, sparse_conv2d, to_batch_innermost  # noqa: E402
from fastprune.reference.sparse import dense_to_csr  # noqa: E402

# (name, in channels, out channels, map size, stride): every 3x3 conv shape of the CIFAR ResNet-18
RESNET18_CONVS = [("conv1", 3, 64, 32, 1), ("layer1 conv", 64, 64, 32, 1), ("layer2.0.conv1", 64, 128, 32, 2),
                  ("layer2 conv", 128, 128, 16, 1), ("layer3.0.conv1", 128, 256, 16, 2),
                  ("layer3 conv", 256, 256, 8, 1), ("layer4.0.conv1", 256, 512, 8, 2),
                  ("layer4 conv", 512, 512, 4, 1)]


def _median_seconds(fn, repeats: int = 9) -> float:
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def layers(batch: int = 64) -> None:
    torch.manual_seed(0)
    print("| layer | sparsity | GFLOP on non-zeros | MB moved (in + out + staged copy + weights) "
          "| batch_innermost ms (GFLOP/s) | tiled ms (GFLOP/s, GB/s) |")
    print("|---|---|---|---|---|---|")
    for sparsity in (0.9, 0.99):
        for name, c, oc, hw, stride in RESNET18_CONVS:
            weight = torch.randn(oc, c, 3, 3)
            weight[torch.rand_like(weight) < sparsity] = 0
            row_ptr, col_idx, values = dense_to_csr(weight)
            x = to_batch_innermost(torch.randn(batch, c, hw, hw))
            ho = (hw + 2 - 3) // stride + 1
            gflop = 2 * values.numel() * ho * ho * batch / 1e9
            staged = c * (hw + 2) ** 2 * batch * 4  # the tiled algorithm's padded copy, written then read
            moved = (x.numel() * 4 + oc * ho * ho * batch * 4 + 2 * staged + values.numel() * 8) / 2**20
            sec = {a: _median_seconds(lambda a=a: sparse_conv2d(x, row_ptr, col_idx, values, None, c, 3, 3, stride,
                                                                 stride, 1, 1, algo=ALGORITHMS[a]))
                   for a in ("batch_innermost", "tiled")}
            print(f"| {name} {c}->{oc} {hw}x{hw} s{stride} | {sparsity:.0%} | {gflop:.3f} | {moved:.1f} "
                  f"| {sec['batch_innermost'] * 1e3:.2f} ({gflop / sec['batch_innermost']:.0f}) "
                  f"| {sec['tiled'] * 1e3:.2f} ({gflop / sec['tiled']:.0f}, {moved * 2**20 / 1e9 / sec['tiled']:.1f}) |",
                  flush=True)


def untuned(batch: int = 64) -> None:
    from fastprune.models import get_model
    from fastprune.nn import fold_masks, prune_model, sparsify
    from fastprune.utils.timing import interleaved_medians

    print("| model | sparsity | tuned ms | untuned ms | untuned speed / tuned |")
    print("|---|---|---|---|---|")
    for name in ("resnet18", "vgg16"):
        for sparsity in (0.9, 0.95, 0.99):
            torch.manual_seed(0)
            dense = fold_masks(prune_model(get_model(name, 10, 3).eval(), sparsity, method="magnitude"))
            x = torch.rand(batch, 3, 32, 32)
            tuned, plain = sparsify(dense, x, batch_sizes=(batch,)), sparsify(dense)
            with torch.no_grad():
                t = interleaved_medians({"tuned": lambda: tuned(x), "untuned": lambda: plain(x)}, x.device,
                                        repeats=8, warmup=2, burst=4)
            print(f"| {name} | {sparsity:.0%} | {t['tuned'] * 1e3:.1f} | {t['untuned'] * 1e3:.1f} "
                  f"| {t['tuned'] / t['untuned']:.2f} |", flush=True)


def window(batch: int = 64) -> None:
    c = oc = 256
    hw = 8
    print("| non-zeros per output channel | threads | packed into k channels (L1) GFLOP/s "
          "| spread over 256 channels (L2) GFLOP/s |")
    print("|---|---|---|---|")
    x = to_batch_innermost(torch.randn(batch, c, hw, hw))
    # The first configuration timed in a process reads 1.6-3x slow even after warm-up calls (bench/NOTES.md,
    # session 10): a throwaway timing first.
    warm = torch.randn(oc, c, 3, 3) * (torch.rand(oc, c, 3, 3) < 0.1)
    _median_seconds(lambda: sparse_conv2d(x, *dense_to_csr(warm), None, c, 3, 3, 1, 1, 1, 1, 1,
                                          algo=ALGORITHMS["tiled"]), repeats=30)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for k in (16, 8):
            torch.manual_seed(k)
            packed = torch.zeros(oc, c, 3, 3)
            packed[:, :k] = torch.randn(oc, k, 3, 3)  # every output channel reads the same k input channels
            spread = torch.randn(oc, c, 3, 3)
            spread[torch.rand_like(spread) >= k / c] = 0  # about as many non-zeros, anywhere
            rates = []
            for weight in (packed, spread):
                row_ptr, col_idx, values = dense_to_csr(weight)
                sec = _median_seconds(lambda: sparse_conv2d(x, row_ptr, col_idx, values, None, c, 3, 3, 1, 1, 1, 1,
                                                            1, algo=ALGORITHMS["tiled"]))
                rates.append(2 * values.numel() * hw * hw * batch / 1e9 / sec)
            print(f"| {9 * k} | {threads} | {rates[0]:.0f} | {rates[1]:.0f} |", flush=True)


def network(batch: int = 64, model: str = "resnet18", sparsity: float = 0.9, repeats: int = 15) -> None:
    from fastprune.models import get_model
    from fastprune.nn import fold_masks, prune_model, sparsify
    from fastprune.nn.sparse.layers import SparseConv2d

    torch.manual_seed(0)
    dense = fold_masks(prune_model(get_model(model, 10, 3).eval(), sparsity, method="magnitude"))
    x = torch.randn(batch, 3, 32, 32)
    sparse = sparsify(dense, x, batch_sizes=(batch,))
    config = sparse.plan["devices"][next(iter(sparse.plan["devices"]))]
    print(f"{model} at {sparsity:.0%}, batch {batch}: {next(iter(config.values()))['choice']}")
    convs = {name: m for name, m in sparse.named_modules() if isinstance(m, SparseConv2d)}
    seconds: dict[str, list[float]] = {name: [] for name in convs}
    started: dict[str, float] = {}
    hooks = []
    for name, m in convs.items():  # a layer's calls timed from its pre-hook to its hook
        hooks.append(m.register_forward_pre_hook(lambda mod, args, n=name: started.__setitem__(n, time.perf_counter())))
        hooks.append(m.register_forward_hook(lambda mod, args, out, n=name: seconds[n].append(
            time.perf_counter() - started[n])))
    whole = []
    with torch.no_grad():
        for _ in range(3):
            sparse(x)
        for times in seconds.values():
            times.clear()
        for _ in range(repeats):
            start = time.perf_counter()
            sparse(x)
            whole.append(time.perf_counter() - start)
    for hook in hooks:
        hook.remove()
    print("| layer | shape | choice | ms per batch (calls) |")
    print("|---|---|---|---|")
    total = 0.0
    for name, m in convs.items():
        calls = len(seconds[name]) // repeats
        ms = sorted(seconds[name])[len(seconds[name]) // 2] * calls * 1e3  # median call x calls per batch
        total += ms
        print(f"| {name} | {m.in_channels}->{m.weight_shape[0]} {m.kernel_size[0]}x{m.kernel_size[1]} s{m.stride[0]} "
              f"| {m.choice} | {ms:.2f} ({calls}) |")
    print(f"convs {total:.1f} ms of the network's {sorted(whole)[len(whole) // 2] * 1e3:.1f} ms (medians)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["layers", "untuned", "window", "network"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", default="resnet18", help="network: the model (fastprune.models)")
    parser.add_argument("--sparsity", type=float, default=0.9, help="network: the magnitude pruning's sparsity")
    args = parser.parse_args()
    if args.batch < 1:
        raise SystemExit(f"--batch must be at least 1, got {args.batch}")
    if not 0 <= args.sparsity < 1:
        raise SystemExit(f"--sparsity must be in [0, 1), got {args.sparsity}")
    if args.what == "network":
        network(args.batch, args.model, args.sparsity)
    else:
        {"layers": layers, "untuned": untuned, "window": window}[args.what](args.batch)
