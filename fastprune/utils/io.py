"""Files: atomic writes and loads that cannot run code (the bottom layer)."""
from __future__ import annotations

import errno
import os
import pickle
import re
import tempfile

import torch


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file beside ``path``, then rename: ``path`` holds the old file or
    the whole new one, never part of one. A full disk raises ValueError saying so (the previous file
    is kept)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "No space left" in str(exc):
            raise ValueError(f"no space left on device while writing {path!r}; "
                             f"{'the previous file is kept' if os.path.exists(path) else 'nothing was written'}") from None
        raise


def safe_load(path: str, what: str = "checkpoint", map_location="cpu"):
    """torch.load with weights_only=True: tensors and plain data only, so a file cannot run code
    when loaded. Missing files, folders, truncated or corrupt files and files holding other objects
    raise FileNotFoundError / ValueError with one clear line naming the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{what} {path!r} is a folder, not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names the first class it refused ("Unsupported global: GLOBAL torch.nn...Sequential").
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        culprit = found.group(1) if found else (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        hint = (": a whole pickled model (torch.save(model)); save its state_dict() instead (the command line "
                "takes one with --model ARCH)" if found and (".nn.modules." in culprit or culprit.startswith(
                    ("fastprune.models", "torchvision.models", "timm."))) else "")
        raise ValueError(f"{what} {path!r} holds objects other than tensors and plain data ({culprit}); refused, "
                         f"since loading it could run code{hint}") from None
    except (RuntimeError, EOFError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{what} {path!r} is not a readable torch file (truncated or corrupt?): {first[:160]}") from None
