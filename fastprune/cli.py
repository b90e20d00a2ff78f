"""The ``fastprune`` command.

  fastprune info                  versions, backends and extension status as one JSON object
  fastprune demo                  adversarially train a small CNN on digits, print its robustness
  fastprune eval --checkpoint P   robust accuracy of a saved model under the attack suite
  fastprune bench sparse ...      sparse-inference latency vs the best dense (fastprune.benchmarks.sparse)
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _info(args) -> int:
    import fastprune
    from fastprune import backends

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "version": fastprune.__version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "backends": backends.available_backends(),
        "extension": backends.extension_info(),
    }
    print(json.dumps(info, indent=2))
    return 0


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("fastprune: --device cuda given but no CUDA device is available")
    return device


def _demo(args) -> int:
    from fastprune.attacks import PGD, evaluate, format_table
    from fastprune.data import get_dataset
    from fastprune.models import get_model
    from fastprune.train import save_model, train_classifier

    device = _device(args.device)
    torch.manual_seed(args.seed)
    data = get_dataset("digits")
    epochs = 3 if args.quick else args.epochs
    model = get_model("cnn-small", data.num_classes, data.in_channels).to(device)
    attack = PGD(model, eps=args.eps, alpha=args.eps / 4, steps=5 if args.quick else 7, seed=args.seed)
    print(f"PGD adversarial training of cnn-small on digits ({len(data.train)} train images), "
          f"eps={args.eps}, {epochs} epochs, on {device}", flush=True)
    start = time.perf_counter()
    train_classifier(model, data.train, epochs=epochs, attack=attack, seed=args.seed, progress=not args.quiet)
    print(f"trained in {time.perf_counter() - start:.1f} s", flush=True)
    attacks = ("clean", "fgsm", "pgd20") if args.quick else ("clean", "fgsm", "pgd20", "cw", "apgd-ce", "apgd-t")
    start = time.perf_counter()
    result = evaluate(model, data.test.tensors, attacks, eps=args.eps, seed=args.seed, progress=not args.quiet)
    print(f"\nrobustness on the {result['n']} held-out test images "
          f"(evaluated in {time.perf_counter() - start:.1f} s):")
    print(format_table(result))
    if args.save:
        save_model(args.save, model, "cnn-small", data.num_classes, data.in_channels, eps=args.eps)
        print(f"saved the model to {args.save}; try: fastprune eval --checkpoint {args.save} --eps {args.eps}")
    return 0


def _eval(args) -> int:
    from fastprune.attacks import evaluate, format_table
    from fastprune.data import get_dataset
    from fastprune.train import load_model

    device = _device(args.device)
    model, _ = load_model(args.checkpoint, device)
    data = get_dataset(args.data, root=args.root)
    result = evaluate(model, data.test.tensors, args.attacks, eps=args.eps, norm=args.norm,
                      batch_size=args.batch_size, seed=args.seed, progress=not args.quiet,
                      amp=args.amp, channels_last=args.channels_last, cuda_graph=args.cuda_graph)
    print(format_table(result))
    if args.json:
        print(json.dumps(result))
    return 0


def _bench(args) -> int:
    if args.suite == "sparse":
        from fastprune.benchmarks.sparse import main as sparse_main

        return sparse_main(args.rest)
    raise ValueError(f"unknown benchmark {args.suite!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastprune", description="Fast adversarially robust pruning.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="versions, backends and extension status (JSON)").set_defaults(func=_info)

    demo = sub.add_parser("demo", help="adversarially train a small CNN on digits and print its robustness")
    demo.add_argument("--eps", type=float, default=0.1, help="Linf radius in pixel units (default 0.1)")
    demo.add_argument("--epochs", type=int, default=15)
    demo.add_argument("--quick", action="store_true", help="a few epochs and three attacks (for tests)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--save", default=None, help="write the trained model's checkpoint here")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    ev = sub.add_parser("eval", help="robust accuracy of a checkpoint under the attack suite")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", default="digits")
    ev.add_argument("--root", default=None, help="folder of the data set's files")
    ev.add_argument("--attacks", nargs="+", default=["clean", "fgsm", "pgd20", "cw", "apgd-ce", "apgd-t"])
    ev.add_argument("--eps", type=float, default=8 / 255)
    ev.add_argument("--norm", choices=("linf", "l2"), default="linf")
    ev.add_argument("--batch-size", type=int, default=256)
    ev.add_argument("--device", default=None)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--amp", action="store_true")
    ev.add_argument("--channels-last", action="store_true")
    ev.add_argument("--cuda-graph", action="store_true")
    ev.add_argument("--json", action="store_true", help="also print the result as JSON")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=_eval)

    bench = sub.add_parser("bench", help="benchmarks shipped with the package: sparse",
                           description="fastprune bench sparse [--model ...] [--sparsity ...] [--batch ...]")
    bench.add_argument("suite", choices=["sparse"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the suite's own options (--help for them)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"fastprune {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
