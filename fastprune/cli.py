"""The ``fastprune`` command.

  fastprune info                  versions, backends and extension status as one JSON object
  fastprune demo                  the robust-pruning study on digits (fastprune.study): every method,
                                  90/95/99% sparsity, five attacks, latency; results into --out
  fastprune eval --checkpoint P   robust accuracy of a saved model under the attack suite
  fastprune bench sparse ...      sparse-inference latency vs the best dense (fastprune.benchmarks.sparse)
  fastprune bench sparse-grad ... attacks and finetune steps on sparse vs masked dense layers
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
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda given but no CUDA device is available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are {torch.cuda.device_count()} CUDA devices")
    return device


def _check_model_fits(model, data, name: str, data_name: str) -> None:
    """One forward of one training image: a model that cannot take the data set's images (vgg16 on
    8x8 digits) stops here with one line instead of a traceback from deep inside."""
    from fastprune.utils.checks import eval_mode, logits_of

    x = data.train.tensors[0][:1].to(next(model.parameters()).device)
    try:
        with torch.no_grad(), eval_mode(model):
            out = logits_of(model(x))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0][:160]
        raise ValueError(f"--model {name} cannot take {data_name}'s images of shape {tuple(x.shape[1:])}: "
                         f"{first}") from None
    if out.shape[-1] != data.num_classes:
        raise ValueError(f"--model {name} has {out.shape[-1]} outputs, {data_name} has {data.num_classes} classes")


def _demo(args) -> int:
    import dataclasses

    from fastprune.study import StudySettings, run_study

    device = _device(args.device)
    settings = StudySettings.for_data(args.data, quick=args.quick)
    overrides = {k: v for k, v in (("eps", args.eps), ("base_epochs", args.epochs), ("model", args.model),
                                   ("sparsities", args.sparsities), ("methods", args.methods)) if v is not None}
    settings = dataclasses.replace(settings, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    settings.check()
    out = args.out or os.path.join("runs", f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a file, not a folder")
    print(f"fastprune demo: robust pruning on {settings.data} into {out} (on {device}; rerun with --out {out} to resume)",
          flush=True)
    started = time.perf_counter()
    run_study(out, settings, device=device, seed=args.seed, progress=not args.quiet,
              log=lambda line: print(line, flush=True))
    with open(os.path.join(out, "results.md")) as f:
        print("\n" + f.read())
    print(f"done in {time.perf_counter() - started:.0f} s; results.md, results.csv and the plots are in {out}")
    return 0


def _load_checkpoint(path: str, device, arch: str | None, data, sparsity: float | None = None,
                     normalize: str = "none"):
    """(model, {"model", "num_classes", "in_channels"}): a checkpoint of save_model, or with --model
    ARCH a plain state_dict: the papers' or RobustBench's format for a zoo ARCH, the library's own
    names for torchvision:/timm:/file.py:factory (fastprune.models.load_pretrained; a HYDRA score
    checkpoint needs ``sparsity`` and comes back with fixed-mask layers). A checkpoint of a file
    factory's model needs --model naming that factory again."""
    from fastprune.models import available_models, load_pretrained
    from fastprune.nn import apply_masks
    from fastprune.train import load_model
    from fastprune.train.checkpoint import safe_load

    obj = safe_load(path, "checkpoint")  # tensors and plain data only: no file runs code here
    if isinstance(obj, dict) and {"model", "num_classes", "in_channels", "state_dict"} <= set(obj):
        return load_model(path, device, model=arch)
    if isinstance(obj, dict) and obj.get("format") == "fastprune-sparse":
        return load_model(path, device)  # refused there with its own message
    if arch is None:
        raise ValueError(f"{path!r} is not a fastprune checkpoint; for a plain state_dict (the papers' or "
                         f"RobustBench's format, or a torchvision/timm model's) name its architecture with --model "
                         f"(one of {available_models()}, or torchvision:NAME, timm:NAME, path/to/file.py:factory)")
    model = load_pretrained(arch, path, data.num_classes, data.in_channels, map_location="cpu", sparsity=sparsity,
                            normalize=normalize)
    if getattr(model, "hydra_masks", None):
        apply_masks(model, model.hydra_masks)
    return model.to(device), {"model": arch, "num_classes": data.num_classes, "in_channels": data.in_channels}


def _load_any(path: str, device, arch: str | None = None, data=None, sparsity: float | None = None,
              normalize: str = "none"):
    """A checkpoint of save_model (dense or masked), a sparse model of save_sparse, or with --model a
    plain state_dict (see _load_checkpoint)."""
    from fastprune.nn import load_sparse
    from fastprune.train.checkpoint import safe_load

    obj = safe_load(path, "checkpoint")  # tensors and plain data only: no file runs code here
    if isinstance(obj, dict) and obj.get("format") == "fastprune-sparse":
        return load_sparse(path, map_location=device, model=arch).eval()
    return _load_checkpoint(path, device, arch, data, sparsity, normalize)[0]


def _training_device(args) -> torch.device:
    """This process's device: under torchrun (WORLD_SIZE > 1) it joins the process group and takes
    its local GPU (or the CPU, with gloo); otherwise --device as usual."""
    from fastprune.train.distributed import init_from_env

    return init_from_env(args.device) or _device(args.device)


# Settings that may differ when a run is resumed: they change how it is shown, not what it computes.
_RESUME_FREE = {"quiet", "config", "out"}


def _run_dir(args, kind: str) -> str:
    """Create (or reopen) the run directory and hold its lock; write the resolved config. A run
    directory that exists resumes, and only with the settings it was started with: differing keys
    stop the command with one line naming them. Rank 0 names the folder for every rank."""
    from fastprune.train import distributed as dist

    out = args.out or os.path.join("runs", f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    if dist.is_distributed():
        shared = [out]
        torch.distributed.broadcast_object_list(shared, src=0)
        out = shared[0]
    if dist.is_main():
        if os.path.exists(out) and not os.path.isdir(out):
            raise ValueError(f"--out {out!r} is a file, not a folder")
        os.makedirs(out, exist_ok=True)
        _lock(out)
        from fastprune.train.loops import remove_stale_temporaries

        remove_stale_temporaries(out)  # what a kill during a write left (the stages' folders: fit does)
        config = {k: v for k, v in vars(args).items() if k not in ("func", "rest")}
        path = os.path.join(out, "config.json")
        if os.path.exists(path):
            with open(path) as f:
                try:
                    before = json.load(f)
                except json.JSONDecodeError:
                    raise ValueError(f"--out {out!r}: its config.json is unreadable; use a new folder") from None
            differ = sorted(k for k in set(before) | set(config)
                            if k not in _RESUME_FREE and before.get(k) != config.get(k))
            if differ:
                shown = ", ".join(f"{k} ({before.get(k)!r} -> {config.get(k)!r})" for k in differ[:4])
                raise ValueError(f"--out {out!r} holds a run started with other settings: {shown}"
                                 f"{' ...' if len(differ) > 4 else ''}; resume with the same settings or use a new "
                                 f"--out")
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(config, f, indent=1)
        os.replace(tmp, path)
    dist.barrier()
    return out


def _lock(out: str) -> None:
    """Take ``out``'s lock file (holding this process's pid) or stop: two processes writing one run
    directory would overwrite each other's checkpoints. A lock whose process has died is taken over.
    Released when this process exits."""
    import atexit

    path = os.path.join(out, ".lock")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise ValueError(f"--out {out!r} is in use by another fastprune process (pid {pid}); wait for it "
                                 f"or use another --out") from None
            try:
                os.unlink(path)  # stale: its process is gone
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(_unlock, path, os.getpid())
        return
    raise ValueError(f"--out {out!r}: could not take its lock file {path!r}")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without signalling; PermissionError means
    it exists but belongs to someone else)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _unlock(path: str, pid: int) -> None:
    try:
        with open(path) as f:
            if f.read().strip() == str(pid):
                os.unlink(path)
    except OSError:
        pass


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

    return make_objective(args.objective, eps=args.eps, alpha=args.alpha, steps=args.steps, beta=args.beta,
                          bn_forwards=args.bn_forwards, norm=args.norm)


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


def _fit_options(args, data) -> dict:
    """Options every training command passes to fit(): batching, seed, progress, augmentation
    ("auto": CIFAR's crop+flip on cifar10/cifar100, none elsewhere), AMP, channels_last, optimiser and
    schedule, and which epoch to keep ("best_robust", the papers' scripts: PGD-10 on the test split
    after every epoch, at --eps with step --alpha)."""
    from fastprune.attacks import PGD
    from fastprune.data.augment import random_crop_flip

    augment = args.augment if args.augment != "auto" else ("crop-flip" if args.data.startswith("cifar") else "none")
    options = dict(batch_size=args.batch_size, seed=args.seed, progress=not args.quiet, amp=args.amp,
                   channels_last=args.channels_last, augment=random_crop_flip if augment == "crop-flip" else None,
                   sync_bn=args.sync_bn, optimizer=args.optimizer, schedule=args.schedule,
                   milestones=tuple(args.milestones or ()), gamma=args.gamma, keep=args.keep)
    if args.keep == "best_robust":
        eps, alpha, seed, norm = args.eps, args.alpha, args.seed, args.norm
        options.update(val=data.test.tensors,
                       val_attack=lambda model: PGD(model, eps=eps, alpha=alpha, steps=10, norm=norm, seed=seed))
    return options


def _train_normalize(args):
    """--normalize for get_model: a zoo model keeps its own normalisation ("default")."""
    from fastprune.models.external import is_external

    return args.normalize if is_external(args.model) else "default"


def _train(args) -> int:
    from fastprune.data import get_dataset
    from fastprune.models import get_model
    from fastprune.train import fit

    started = time.perf_counter()
    device = _training_device(args)
    data = get_dataset(args.data, root=args.root)
    torch.manual_seed(args.seed)
    model = get_model(args.model, data.num_classes, data.in_channels, normalize=_train_normalize(args)).to(device)
    _check_model_fits(model, data, args.model, args.data)  # before the run directory is made
    out = _run_dir(args, "train")
    fit(model, data.train, objective=_objective(args), epochs=args.epochs, lr=args.lr, run_dir=out,
        **_fit_options(args, data))
    _finish(out, model, data, args, started, (args.model, data.num_classes, data.in_channels), {"data": args.data})
    return 0


def _prune(args) -> int:
    from fastprune.data import get_dataset
    from fastprune.nn import check_sparsity
    from fastprune.attacks import PGD
    from fastprune.prune import hydra, lwm, pwoa

    check_sparsity(args.sparsity)
    if args.method == "pwoa" and not args.teacher:
        raise ValueError("--teacher is required for pwoa (the robust model it distils from)")
    started = time.perf_counter()
    device = _training_device(args)
    torch.manual_seed(args.seed)  # attacks' random starts, HSIC's and ADMM's draws: the same every run
    data = get_dataset(args.data, root=args.root)
    model, ckpt = _load_checkpoint(args.checkpoint, device, args.model, data, args.checkpoint_sparsity,
                                   args.normalize)
    _check_model_fits(model, data, ckpt["model"], args.data)
    out = _run_dir(args, f"prune-{args.method}")
    common = dict(run_dir=out, sparse_kernels=args.sparse_kernels, **_fit_options(args, data))
    if args.method == "hydra":
        hydra(model, data.train, sparsity=args.sparsity, objective=_objective(args), prune_epochs=args.prune_epochs,
              finetune_epochs=args.finetune_epochs, prune_lr=args.prune_lr, finetune_lr=args.finetune_lr,
              freeze_bn=args.freeze_bn, score_init=args.score_init, **common)
    elif args.method == "lwm":
        lwm(model, data.train, sparsity=args.sparsity, objective=_objective(args),
            finetune_epochs=args.finetune_epochs, finetune_lr=args.finetune_lr, **common)
    else:
        teacher, _ = _load_checkpoint(args.teacher, device, args.model, data, normalize=args.normalize)
        pwoa(model, teacher, data.train, sparsity=args.sparsity, admm_epochs=args.admm_epochs,
             retrain_epochs=args.retrain_epochs, admm_lr=args.admm_lr, retrain_lr=args.retrain_lr, temperature=args.temperature, alpha=args.kd_alpha,
             lambda_x=args.lambda_x, lambda_y=args.lambda_y, num_classes=data.num_classes,
             prune_layers=args.prune_layers, admm_schedule=args.admm_schedule, reproject_z=args.reproject_z,
             mix_ratio=args.mix_ratio, mix_attack=PGD(model, eps=args.eps, alpha=args.alpha, steps=args.steps)
             if args.mix_ratio > 0 else None, ce_weight=args.ce_weight, base_loss=args.base_loss, **common)
    _finish(out, model, data, args, started, (ckpt["model"], ckpt["num_classes"], ckpt["in_channels"]),
            {"method": args.method, "sparsity": args.sparsity}, method=args.method)
    return 0


def _finetune(args) -> int:
    from fastprune.data import get_dataset
    from fastprune.prune import finetune_phase

    started = time.perf_counter()
    device = _training_device(args)
    torch.manual_seed(args.seed)
    data = get_dataset(args.data, root=args.root)
    model, ckpt = _load_checkpoint(args.checkpoint, device, args.model, data, args.checkpoint_sparsity,
                                   args.normalize)
    _check_model_fits(model, data, ckpt["model"], args.data)
    out = _run_dir(args, "finetune")
    finetune_phase(model, data.train, objective=_objective(args), epochs=args.epochs, lr=args.lr, run_dir=out,
                   sparse_kernels=args.sparse_kernels, **_fit_options(args, data))
    _finish(out, model, data, args, started, (ckpt["model"], ckpt["num_classes"], ckpt["in_channels"]), {})
    return 0


def _export(args) -> int:
    from fastprune.data import get_dataset
    from fastprune.nn import save_sparse, sparsify

    if not args.out:
        raise ValueError("export needs --out FILE: where to write the sparse model")
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a folder; give a file name (e.g. model.sparse.pt)")
    device = _device(args.device)
    data = get_dataset(args.data, root=args.root)
    model, _ = _load_checkpoint(args.checkpoint, device, args.model, data, args.checkpoint_sparsity,
                                   args.normalize)
    example = data.test.tensors[0][: args.batch_size].to(device)
    print("timing dense and sparse layers for batch sizes 1 to 256 (a minute or more on a CPU)", flush=True)
    sparse = sparsify(model, example)
    save_sparse(sparse, args.out)
    print(f"wrote {args.out}:\n{sparse.summary()}")
    return 0


def _eval(args) -> int:
    from fastprune.attacks import evaluate, format_table
    from fastprune.data import get_dataset

    device = _device(args.device)
    data = get_dataset(args.data, root=args.root)
    model = _load_any(args.checkpoint, device, args.model, data, args.checkpoint_sparsity, args.normalize)
    settings = {}
    for name in args.attacks:
        if name.lower() in ("autoattack", "autoattack-plus"):
            settings[name] = {"n_queries": args.square_queries, "steps": args.autoattack_steps}
        elif name.lower() == "square":
            settings[name] = {"n_queries": args.square_queries}
    result = evaluate(model, data.test.tensors, args.attacks, eps=args.eps, norm=args.norm,
                      batch_size=args.batch_size, seed=args.seed, progress=not args.quiet, settings=settings,
                      amp=args.amp, channels_last=args.channels_last, cuda_graph=args.cuda_graph)
    print(format_table(result))
    if args.json:
        print(json.dumps(result))
    return 0


def _bench(args) -> int:
    if args.suite == "sparse":
        from fastprune.benchmarks.sparse import main as sparse_main

        return sparse_main(args.rest)
    if args.suite == "sparse-grad":
        from fastprune.benchmarks.sparse_grad import main as sparse_grad_main

        return sparse_grad_main(args.rest)
    raise ValueError(f"unknown benchmark {args.suite!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastprune", description="Fast adversarially robust pruning.")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("info", help="versions, backends and extension status (JSON)").set_defaults(func=_info)

    demo = sub.add_parser("demo", help="the robust-pruning study on digits: every method at 90/95/99%% sparsity",
                          description="Adversarially train a CNN on digits, prune it with HYDRA, LWM, PwoA and "
                                      "naive pruning, evaluate every model under FGSM, PGD-20, CW and AutoAttack, time "
                                      "dense vs sparse inference; results.md/csv and plots go into --out.")
    demo.add_argument("--out", default=None, help="run directory (default: a new folder under ./runs; an existing "
                                                  "one resumes)")
    demo.add_argument("--quick", action="store_true", help="one or two epochs per phase (for tests)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--data", choices=("digits", "mnist5k"), default="digits",
                      help="digits (8x8, eps 0.1) or mnist5k (5000 real MNIST images, eps 0.3: about 20 minutes "
                           "on 2 CPU cores)")
    demo.add_argument("--eps", type=float, default=None, help="Linf radius in pixel units (default 0.1; mnist5k 0.3)")
    demo.add_argument("--epochs", type=int, default=None, help="epochs of the base model's adversarial training")
    demo.add_argument("--model", default=None, help="the model to train and prune (default cnn-wide)")
    demo.add_argument("--sparsities", type=float, nargs="+", default=None, help="default 0.9 0.95 0.99")
    demo.add_argument("--methods", nargs="+", default=None, help="default hydra lwm pwoa naive")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    def checkpoint_model_options(p):
        p.add_argument("--model", default=None,
                       help="the architecture of a plain state_dict --checkpoint: a zoo name (the papers' or "
                            "RobustBench's format, fastprune.models.load_pretrained), torchvision:NAME, timm:NAME or "
                            "path/to/file.py:factory (also needed again for a fastprune file of such a factory model)")
        p.add_argument("--checkpoint-sparsity", type=float, default=None,
                       help="a HYDRA score checkpoint (popup_scores): the sparsity it was pruned to (HYDRA's k = 1 - it)")
        p.add_argument("--normalize", choices=("none", "imagenet", "cifar10"), default="none",
                       help="a torchvision/timm/file --model's input normalisation (it still takes [0, 1] images)")

    ev = sub.add_parser("eval", help="robust accuracy of a checkpoint under AutoAttack (or other attacks)",
                        description="Accuracy clean, under each attack (AutoAttack standard by default, reported "
                                    "after each of its components), and the worst case per image.")
    ev.add_argument("--checkpoint", required=True)
    checkpoint_model_options(ev)
    ev.add_argument("--data", default="digits")
    ev.add_argument("--root", default=None, help="folder of the data set's files")
    ev.add_argument("--attacks", nargs="+", default=["clean", "autoattack"],
                    help="from: clean fgsm pgdN cw cwN apgd-ce apgd-dlr apgd-t fab fab-t square autoattack "
                         "autoattack-plus (default: clean autoattack)")
    ev.add_argument("--square-queries", type=int, default=5000,
                    help="Square's queries, alone and inside AutoAttack (AutoAttack: 5000)")
    ev.add_argument("--autoattack-steps", type=int, default=100,
                    help="iterations of AutoAttack's APGD and FAB components (AutoAttack: 100)")
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
            p.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                           help="under torchrun, BatchNorm uses the whole global batch's statistics (default on)")
            p.add_argument("--objective", choices=("natural", "pgd", "trades", "mart"), default="trades")
            p.add_argument("--eps", type=float, default=0.031, help="Linf radius (HYDRA's configs: 0.031)")
            p.add_argument("--alpha", type=float, default=0.0078, help="attack step (HYDRA's configs: 0.0078)")
            p.add_argument("--steps", type=int, default=10)
            p.add_argument("--beta", type=float, default=6.0)
            p.add_argument("--norm", choices=("linf", "l2"), default="linf",
                           help="threat model of the objective and of --keep's validation attack (l2: TRADES only)")
            p.add_argument("--bn-forwards", choices=("hydra", "once"), default="hydra",
                           help="TRADES: BatchNorm statistics from HYDRA's four train-mode passes per batch (three "
                                "clean, one adversarial) or from the loss's two")
            p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                           help="sgd (momentum 0.9; the papers' CIFAR runs) or adam (PwoA's MNIST runs)")
            p.add_argument("--schedule", choices=("cosine", "multistep", "cyclic", "constant"), default="cosine",
                           help="learning rate: cosine to zero; multistep (x --gamma at each --milestones epoch); "
                                "cyclic (lr, lr/10, lr/100 by epoch); constant")
            p.add_argument("--milestones", type=int, nargs="+", default=None, help="epochs, for --schedule multistep")
            p.add_argument("--gamma", type=float, default=0.1, help="factor at each milestone")
            p.add_argument("--keep", choices=("best_robust", "last"), default="best_robust",
                           help="the epoch whose weights the run ends with: best PGD-10 accuracy on the test split "
                                "after each epoch (the papers' scripts), or the last")

    tr = sub.add_parser("train", help="train a model (natural, PGD-AT or TRADES)")
    tr.add_argument("--model", default="cnn-small",
                    help="a zoo name, torchvision:NAME, timm:NAME or path/to/file.py:factory")
    tr.add_argument("--normalize", choices=("none", "imagenet", "cifar10"), default="none",
                    help="a torchvision/timm/file model's input normalisation (it still takes [0, 1] images)")
    tr.add_argument("--epochs", type=int, default=100)
    tr.add_argument("--lr", type=float, default=0.1)
    common(tr)
    tr.set_defaults(func=_train)

    pr = sub.add_parser("prune", help="prune a checkpoint with HYDRA, LWM or PwoA")
    pr.add_argument("--method", choices=("hydra", "lwm", "pwoa"), required=True)
    pr.add_argument("--checkpoint", required=True)
    checkpoint_model_options(pr)
    pr.add_argument("--sparsity", type=float, required=True)
    pr.add_argument("--teacher", default=None, help="PwoA: the robust model to distil from")
    pr.add_argument("--prune-epochs", type=int, default=20)
    pr.add_argument("--finetune-epochs", type=int, default=100)
    pr.add_argument("--prune-lr", type=float, default=0.1)
    pr.add_argument("--finetune-lr", type=float, default=0.01)
    pr.add_argument("--score-init", choices=("scaled", "kaiming_uniform", "kaiming_normal", "snip"), default="scaled",
                    help="HYDRA's score initialisation (its scripts: scaled, the magnitude mask first; snip: SNIP's "
                         "|dL/dW * W| on one training batch, HYDRA's --snip-init)")
    pr.add_argument("--freeze-bn", action="store_true",
                    help="HYDRA: keep BatchNorm's scale and shift fixed in the prune phase (HYDRA's scripts train "
                         "them with the scores)")
    pr.add_argument("--sparse-kernels", action="store_true",
                    help="the finetune (HYDRA, LWM) or masked retrain (PwoA) on the sparse kernels, trainable CSR values")
    pr.add_argument("--admm-epochs", type=int, default=50)
    pr.add_argument("--retrain-epochs", type=int, default=100)
    pr.add_argument("--admm-lr", type=float, default=0.01, help="PwoA's ADMM stage (MNIST: 5e-4 with --optimizer adam)")
    pr.add_argument("--retrain-lr", type=float, default=0.005, help="PwoA's masked retrain (MNIST: 1e-3)")
    pr.add_argument("--temperature", type=float, default=30.0)
    pr.add_argument("--kd-alpha", type=float, default=10.0)
    pr.add_argument("--lambda-x", type=float, default=2e-5)
    pr.add_argument("--lambda-y", type=float, default=1e-4)
    pr.add_argument("--admm-schedule", choices=("cyclic", "cosine", "constant"), default="cyclic",
                    help="PwoA's ADMM-stage learning rate: cyclic (lr, lr/10, lr/100 over each 3-epoch ADMM period, "
                         "PwoA's code), cosine or constant")
    pr.add_argument("--reproject-z", action=argparse.BooleanOptionalAction, default=True,
                    help="PwoA: Z = proj(W) at the start of every ADMM epoch (PwoA's code); off: only at dual updates")
    pr.add_argument("--mix-ratio", type=float, default=0.0,
                    help="PwoA: probability that a batch (both stages) is replaced by PGD examples of it (--eps, "
                         "--alpha, --steps), the usual loss computed on them")
    pr.add_argument("--ce-weight", type=float, default=0.0,
                    help="PwoA: weight of a base loss added in both stages (its xentropy_weight; 0 in its scripts)")
    pr.add_argument("--base-loss", choices=("ce", "trades", "mart"), default="ce",
                    help="PwoA with --ce-weight: cross-entropy (on the PGD batch when mixed in), or PwoA's TRADES "
                         "or MART loss on the mixed-in batches")
    pr.add_argument("--prune-layers", choices=("pwoa", "all"), default="pwoa",
                    help="PwoA: which layers to prune: convs and layers named 'fc' (PwoA's code) or every conv "
                         "and linear layer")
    common(pr)
    pr.set_defaults(func=_prune)

    ft = sub.add_parser("finetune", help="robust finetune of a pruned checkpoint, masks fixed")
    ft.add_argument("--checkpoint", required=True)
    checkpoint_model_options(ft)
    ft.add_argument("--epochs", type=int, default=100)
    ft.add_argument("--lr", type=float, default=0.01)
    ft.add_argument("--sparse-kernels", action="store_true",
                    help="train the pruned layers on the sparse kernels (trainable CSR values): the same run, "
                         "at the non-zeros' cost")
    common(ft)
    ft.set_defaults(func=_finetune)

    ex = sub.add_parser("export", help="write the sparse inference model of a pruned checkpoint")
    ex.add_argument("--checkpoint", required=True)
    checkpoint_model_options(ex)
    common(ex, objective=False)
    ex.set_defaults(func=_export)

    bench = sub.add_parser("bench", help="benchmarks shipped with the package: sparse, sparse-grad",
                           description="fastprune bench sparse [--model ...] [--sparsity ...] [--batch ...]; "
                                       "fastprune bench sparse-grad [--sparsity ...] [--batch ...]")
    bench.add_argument("suite", choices=["sparse", "sparse-grad"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the suite's own options (--help for them)")
    bench.set_defaults(func=_bench)
    return parser


def _config_value(path: str, action: argparse.Action, value):
    """A --config value checked as argparse would check it on the command line: flags take YAML
    booleans only, typed options convert, choices hold, lists only where the option takes several."""
    option = f"--config {path!r}: {action.option_strings[-1] if action.option_strings else action.dest}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{option} must be true or false, got {value!r}")
        return value
    several = action.nargs in ("+", "*")
    items = value if several and isinstance(value, list) else [value]
    if isinstance(value, (list, dict)) and not several:
        raise ValueError(f"{option} takes one value, got {value!r}")
    converted = []
    for item in items:
        if isinstance(item, (list, dict)) or item is None and action.type is not None:
            raise ValueError(f"{option} must be a single value, got {item!r}")
        if action.type is not None and item is not None:
            if action.type in (int, float) and isinstance(item, bool):
                raise ValueError(f"{option} must be a number, got {item!r}")
            try:
                item = action.type(item)
            except (TypeError, ValueError):
                raise ValueError(f"{option} must be {getattr(action.type, '__name__', 'valid')}, got {item!r}") from None
        elif isinstance(item, (int, float)):  # an untyped string option given a YAML number
            item = str(item)
        if action.choices is not None and item not in action.choices:
            raise ValueError(f"{option} must be one of {list(action.choices)}, got {item!r}")
        converted.append(item)
    return converted if several else converted[0]


def _with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line with the --config file's values (if any) as the subcommand's defaults.
    The file is found by scanning the line first, so options it provides need not be repeated."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"), None)
    path = path or next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    subparsers = parser._subparsers._group_actions[0].choices
    if path and argv and argv[0] in subparsers:
        import yaml

        if not os.path.isfile(path):
            raise ValueError(f"--config {path!r} is not a file")
        try:
            with open(path) as f:
                values = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"--config {path!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise ValueError(f"--config {path!r} must hold a mapping of option: value")
        sub = subparsers[argv[0]]
        defaults = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(defaults) - {a.dest for a in sub._actions})
        if unknown:
            raise ValueError(f"--config {path!r}: unknown options {unknown}")
        actions = {a.dest: a for a in sub._actions}
        defaults = {k: _config_value(path, actions[k], v) for k, v in defaults.items()}
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
