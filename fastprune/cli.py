"""The ``fastprune`` command.

  fastprune info                  versions, backends and extension status as one JSON object
  fastprune demo                  the robust-pruning study on digits (fastprune.study): every method,
                                  90/95/99% sparsity, five attacks, latency; results into --out
  fastprune eval --checkpoint P   robust accuracy of a saved model under the attack suite
  fastprune bench sparse ...      sparse-inference latency vs the best dense (fastprune.benchmarks.sparse)
  fastprune train ...             (robust) training of a model; a run directory that resumes
  fastprune prune --method M ...  HYDRA, LWM or PwoA pruning of a checkpoint
  fastprune finetune ...          robust finetune of a pruned checkpoint, masks fixed
  fastprune export ...            the sparse inference model of a pruned checkpoint

Every command takes --config file.yaml whose keys are its long options (dashes or underscores);
flags on the command line win. Runs write into --out (default: a new folder under ./runs): the
resolved config, checkpoints, metrics, the model and a report.
"""
from __future__ import annotations

import argparse
import json
import os
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
    import dataclasses

    from fastprune.study import StudySettings, run_study

    device = _device(args.device)
    settings = StudySettings.quick() if args.quick else StudySettings()
    overrides = {k: v for k, v in (("eps", args.eps), ("base_epochs", args.epochs), ("model", args.model),
                                   ("sparsities", args.sparsities), ("methods", args.methods)) if v is not None}
    settings = dataclasses.replace(settings, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    settings.check()
    out = args.out or os.path.join("runs", f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    print(f"fastprune demo: robust pruning on digits into {out} (on {device}; rerun with --out {out} to resume)",
          flush=True)
    started = time.perf_counter()
    run_study(out, settings, device=device, seed=args.seed, progress=not args.quiet,
              log=lambda line: print(line, flush=True))
    with open(os.path.join(out, "results.md")) as f:
        print("\n" + f.read())
    print(f"done in {time.perf_counter() - started:.0f} s; results.md, results.csv and the plots are in {out}")
    return 0


def _load_any(path: str, device):
    """A checkpoint of save_model (dense or masked), or a sparse model of save_sparse."""
    from fastprune.nn import load_sparse
    from fastprune.train import load_model

    import pickle

    try:
        return load_model(path, device)[0]
    except (ValueError, pickle.UnpicklingError):  # not a plain checkpoint: a pickled sparse model?
        return load_sparse(path, map_location=device).eval()


def _training_device(args) -> torch.device:
    """This process's device: under torchrun (WORLD_SIZE > 1) it joins the process group and takes
    its local GPU (or the CPU, with gloo); otherwise --device as usual."""
    from fastprune.train.distributed import init_from_env

    return init_from_env(args.device) or _device(args.device)


def _run_dir(args, kind: str) -> str:
    """Create the run directory and write the resolved config (rank 0 names it for every rank)."""
    from fastprune.train import distributed as dist

    out = args.out or os.path.join("runs", f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    if dist.is_distributed():
        shared = [out]
        torch.distributed.broadcast_object_list(shared, src=0)
        out = shared[0]
    if dist.is_main():
        os.makedirs(out, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if k not in ("func", "rest")}
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
    dist.barrier()
    return out


def _finish(out: str, model, data, args, started: float, save_args: tuple, save_extra: dict, **report_extra) -> None:
    """Rank 0 saves the model and writes the report; every rank waits for it."""
    from fastprune.train import distributed as dist
    from fastprune.train import save_model

    if dist.is_main():
        save_model(os.path.join(out, "model.pt"), model, *save_args, **save_extra)
        _report(out, model, data, args, started, **report_extra)
    dist.barrier()


def _objective(args):
    from fastprune.train import make_objective

    return make_objective(args.objective, eps=args.eps, alpha=args.alpha, steps=args.steps, beta=args.beta)


def _report(out: str, model, data, args, started: float, **extra) -> dict:
    from fastprune.attacks import evaluate, format_table
    from fastprune.nn import sparsity_report

    result = evaluate(model, data.test.tensors, ("clean", "pgd20"), eps=args.eps, seed=args.seed, progress=False)
    report = {"clean": result["clean"], "pgd20": result["pgd20"], "n": result["n"], "eps": args.eps,
              "sparsity": sparsity_report(model)["sparsity"], "wall_s": time.perf_counter() - started, **extra}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(format_table(result))
    print(f"sparsity {report['sparsity']:.2%}, {report['wall_s']:.1f} s; run directory {out}")
    return report


def _fit_options(args) -> dict:
    """Options every training command passes to fit(): batching, seed, progress, augmentation
    ("auto": CIFAR's crop+flip on cifar10/cifar100, none elsewhere), AMP, channels_last."""
    from fastprune.data.augment import random_crop_flip

    augment = args.augment if args.augment != "auto" else ("crop-flip" if args.data.startswith("cifar") else "none")
    return dict(batch_size=args.batch_size, seed=args.seed, progress=not args.quiet, amp=args.amp,
                channels_last=args.channels_last, augment=random_crop_flip if augment == "crop-flip" else None)


def _train(args) -> int:
    from fastprune.data import get_dataset
    from fastprune.models import get_model
    from fastprune.train import fit

    started = time.perf_counter()
    device = _training_device(args)
    out = _run_dir(args, "train")
    data = get_dataset(args.data, root=args.root)
    torch.manual_seed(args.seed)
    model = get_model(args.model, data.num_classes, data.in_channels).to(device)
    fit(model, data.train, objective=_objective(args), epochs=args.epochs, lr=args.lr, run_dir=out,
        **_fit_options(args))
    _finish(out, model, data, args, started, (args.model, data.num_classes, data.in_channels), {"data": args.data})
    return 0


def _prune(args) -> int:
    from fastprune.data import get_dataset
    from fastprune.nn import check_sparsity
    from fastprune.prune import hydra, lwm, pwoa
    from fastprune.train import load_model

    check_sparsity(args.sparsity)
    if args.method == "pwoa" and not args.teacher:
        raise ValueError("--teacher is required for pwoa (the robust model it distils from)")
    started = time.perf_counter()
    device = _training_device(args)
    model, ckpt = load_model(args.checkpoint, device)
    data = get_dataset(args.data, root=args.root)
    out = _run_dir(args, f"prune-{args.method}")
    common = dict(run_dir=out, **_fit_options(args))
    if args.method == "hydra":
        hydra(model, data.train, sparsity=args.sparsity, objective=_objective(args), prune_epochs=args.prune_epochs,
              finetune_epochs=args.finetune_epochs, prune_lr=args.prune_lr, finetune_lr=args.finetune_lr, **common)
    elif args.method == "lwm":
        lwm(model, data.train, sparsity=args.sparsity, objective=_objective(args),
            finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr, **common)
    else:
        teacher, _ = load_model(args.teacher, device)
        pwoa(model, teacher, data.train, sparsity=args.sparsity, admm_epochs=args.admm_epochs,
             retrain_epochs=args.retrain_epochs, temperature=args.temperature, alpha=args.kd_alpha,
             lambda_x=args.lambda_x, lambda_y=args.lambda_y, num_classes=data.num_classes, **common)
    _finish(out, model, data, args, started, (ckpt["model"], ckpt["num_classes"], ckpt["in_channels"]),
            {"method": args.method, "sparsity": args.sparsity}, method=args.method)
    return 0


def _finetune(args) -> int:
    from fastprune.data import get_dataset
    from fastprune.prune import finetune_phase
    from fastprune.train import load_model

    started = time.perf_counter()
    device = _training_device(args)
    model, ckpt = load_model(args.checkpoint, device)
    data = get_dataset(args.data, root=args.root)
    out = _run_dir(args, "finetune")
    finetune_phase(model, data.train, objective=_objective(args), epochs=args.epochs, lr=args.lr, run_dir=out,
                   **_fit_options(args))
    _finish(out, model, data, args, started, (ckpt["model"], ckpt["num_classes"], ckpt["in_channels"]), {})
    return 0


def _export(args) -> int:
    from fastprune.data import get_dataset
    from fastprune.nn import save_sparse, sparsify
    from fastprune.train import load_model

    device = _device(args.device)
    model, _ = load_model(args.checkpoint, device)
    example = get_dataset(args.data, root=args.root).test.tensors[0][: args.batch_size].to(device)
    sparse = sparsify(model, example)
    save_sparse(sparse, args.out)
    kept = sum(d["kept"] == "sparse" for d in sparse.sparsify_decisions.values())
    print(f"wrote {args.out}: {kept}/{len(sparse.sparsify_decisions)} layers sparse "
          f"({sparse.sparsify_choice['kind']})")
    return 0


def _eval(args) -> int:
    from fastprune.attacks import evaluate, format_table
    from fastprune.data import get_dataset

    device = _device(args.device)
    model = _load_any(args.checkpoint, device)
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

    demo = sub.add_parser("demo", help="the robust-pruning study on digits: every method at 90/95/99%% sparsity",
                          description="Adversarially train a CNN on digits, prune it with HYDRA, LWM, PwoA and "
                                      "naive pruning, evaluate every model under FGSM, PGD-20, CW and APGD, time "
                                      "dense vs sparse inference; results.md/csv and plots go into --out.")
    demo.add_argument("--out", default=None, help="run directory (default: a new folder under ./runs; an existing "
                                                  "one resumes)")
    demo.add_argument("--quick", action="store_true", help="one or two epochs per phase (for tests)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--eps", type=float, default=None, help="Linf radius in pixel units (default 0.1)")
    demo.add_argument("--epochs", type=int, default=None, help="epochs of the base model's adversarial training")
    demo.add_argument("--model", default=None, help="the model to train and prune (default cnn-wide)")
    demo.add_argument("--sparsities", type=float, nargs="+", default=None, help="default 0.9 0.95 0.99")
    demo.add_argument("--methods", nargs="+", default=None, help="default hydra lwm pwoa naive")
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

    def common(p, objective=True):
        p.add_argument("--config", default=None, help="YAML file of option values (flags win)")
        p.add_argument("--data", default="digits")
        p.add_argument("--root", default=None, help="folder of the data set's standard files")
        p.add_argument("--batch-size", type=int, default=128)
        p.add_argument("--device", default=None)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", default=None, help="run directory (an existing one resumes)")
        p.add_argument("--quiet", action="store_true")
        if objective:
            p.add_argument("--augment", choices=("auto", "none", "crop-flip"), default="auto",
                           help="on-device augmentation (auto: crop-flip for CIFAR, none elsewhere)")
            p.add_argument("--amp", action="store_true", help="autocast: bf16 on CPU, fp16 with loss scaling on CUDA")
            p.add_argument("--channels-last", action="store_true")
            p.add_argument("--objective", choices=("natural", "pgd", "trades"), default="trades")
            p.add_argument("--eps", type=float, default=8 / 255)
            p.add_argument("--alpha", type=float, default=2 / 255)
            p.add_argument("--steps", type=int, default=10)
            p.add_argument("--beta", type=float, default=6.0)

    tr = sub.add_parser("train", help="train a model (natural, PGD-AT or TRADES)")
    tr.add_argument("--model", default="cnn-small")
    tr.add_argument("--epochs", type=int, default=100)
    tr.add_argument("--lr", type=float, default=0.1)
    common(tr)
    tr.set_defaults(func=_train)

    pr = sub.add_parser("prune", help="prune a checkpoint with HYDRA, LWM or PwoA")
    pr.add_argument("--method", choices=("hydra", "lwm", "pwoa"), required=True)
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--sparsity", type=float, required=True)
    pr.add_argument("--teacher", default=None, help="PwoA: the robust model to distil from")
    pr.add_argument("--prune-epochs", type=int, default=20)
    pr.add_argument("--finetune-epochs", type=int, default=100)
    pr.add_argument("--prune-lr", type=float, default=0.1)
    pr.add_argument("--finetune-lr", type=float, default=0.01)
    pr.add_argument("--admm-epochs", type=int, default=50)
    pr.add_argument("--retrain-epochs", type=int, default=100)
    pr.add_argument("--temperature", type=float, default=30.0)
    pr.add_argument("--kd-alpha", type=float, default=10.0)
    pr.add_argument("--lambda-x", type=float, default=2e-5)
    pr.add_argument("--lambda-y", type=float, default=1e-4)
    common(pr)
    pr.set_defaults(func=_prune)

    ft = sub.add_parser("finetune", help="robust finetune of a pruned checkpoint, masks fixed")
    ft.add_argument("--checkpoint", required=True)
    ft.add_argument("--epochs", type=int, default=100)
    ft.add_argument("--lr", type=float, default=0.01)
    common(ft)
    ft.set_defaults(func=_finetune)

    ex = sub.add_parser("export", help="write the sparse inference model of a pruned checkpoint")
    ex.add_argument("--checkpoint", required=True)
    common(ex, objective=False)
    ex.set_defaults(func=_export)

    bench = sub.add_parser("bench", help="benchmarks shipped with the package: sparse",
                           description="fastprune bench sparse [--model ...] [--sparsity ...] [--batch ...]")
    bench.add_argument("suite", choices=["sparse"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the suite's own options (--help for them)")
    bench.set_defaults(func=_bench)
    return parser


def _with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line with the --config file's values (if any) as the subcommand's defaults.
    The file is found by scanning the line first, so options it provides need not be repeated."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    path = path or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    subparsers = parser._subparsers._group_actions[0].choices
    if path and argv and argv[0] in subparsers:
        import yaml

        with open(path) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"--config {path!r} must hold a mapping of option: value")
        sub = subparsers[argv[0]]
        defaults = {k.replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(defaults) - {a.dest for a in sub._actions})
        if unknown:
            raise ValueError(f"--config {path!r}: unknown options {unknown}")
        sub.set_defaults(**defaults)
        for action in sub._actions:  # options the file provides are no longer required on the line
            if action.dest in defaults:
                action.required = False
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = _with_config(parser, argv)
        code = args.func(args)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Tear the group down on success only, all ranks together: after an error the other
            # ranks may be inside a collective that never completes, and torchrun reaps them.
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
        return code
    except (ValueError, FileNotFoundError, FloatingPointError) as exc:
        command = argv[0] if argv else (sys.argv[1] if len(sys.argv) > 1 else "")
        print(f"fastprune {command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
