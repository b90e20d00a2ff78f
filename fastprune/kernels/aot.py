"""Ahead-of-time compile check of every GPU kernel, on a machine without a GPU.

Triton: each kernel module's ``aot_variants()`` lists every (kernel, signature, constexprs, launch
options) its launcher can choose; each is compiled for sm_90 (Hopper) and sm_80 (Ampere) with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, and ptxas reports its
registers, spills and stack frame. CUDA C++: the built extension's cubins are read with cuobjdump
(registers, stack frame, local memory, shared memory per kernel and architecture).

A variant fails the check on a compile error, on any spill (every listed kernel is a hot loop), or
on shared memory above the architecture's per-block limit. Results go to a CSV table
(bench/results/triton-aot.csv by default).

Run it in a process without ``TRITON_INTERPRET=1`` (the interpreter replaces ``@triton.jit``
functions, which then cannot be compiled): ``python -m fastprune.kernels.aot``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import importlib
import os
import re
import shutil
import subprocess
import sys
import tempfile

MODULES = ("fastprune.kernels.pgd", "fastprune.kernels.hsic", "fastprune.kernels.sparse")
ARCHS = (90, 80)
# Shared memory a block may use (opt-in maximum): sm_90 228 KB less 1 KB reserved, sm_80 164 KB less 1 KB.
SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
FIELDS = ("source", "kernel", "variant", "arch", "num_warps", "num_stages", "registers", "spill_stores",
          "spill_loads", "stack_bytes", "shared_bytes", "ok", "error")


@dataclasses.dataclass
class Row:
    source: str
    kernel: str
    variant: str
    arch: int
    num_warps: int = 0
    num_stages: int = 0
    registers: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    stack_bytes: int = 0
    shared_bytes: int = 0
    ok: bool = True
    error: str = ""

    def check(self) -> "Row":
        problems = []
        if self.spill_stores or self.spill_loads:
            problems.append(f"spills ({self.spill_stores} B stored, {self.spill_loads} B loaded)")
        if self.shared_bytes > SMEM_LIMIT[self.arch]:
            problems.append(f"shared memory {self.shared_bytes} B > sm_{self.arch}'s {SMEM_LIMIT[self.arch]} B")
        if problems:
            self.ok, self.error = False, "; ".join(problems)
        return self


def _ptxas() -> str:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    found = bundled if os.path.exists(bundled) else shutil.which("ptxas")
    if not found:
        raise RuntimeError("ptxas not found (neither in Triton's package nor on PATH)")
    return found


_PTXAS_INFO = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def ptxas_report(ptx: str) -> tuple[int, int, int, int]:
    """(registers, stack frame, spill stores, spill loads) of a PTX module, from ``ptxas -v``."""
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([_ptxas(), "-v", f"--gpu-name={target}", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {res.stderr.strip()[:500]}")
    regs, spills = _PTXAS_INFO.search(res.stderr), _SPILLS.search(res.stderr)
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2)), int(spills.group(3))


def compile_triton(modules=MODULES, archs=ARCHS) -> list[Row]:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    import triton
    from triton.backends.compiler import GPUTarget

    rows = []
    for name in modules:
        module = importlib.import_module(name)
        source = module.__file__.split("fastprune" + os.sep, 1)[-1]
        for variant, fn, signature, constexprs, options in module.aot_variants():
            full = dict(signature)
            full.update({k: "constexpr" for k in constexprs})
            for arch in archs:
                row = Row(f"fastprune/{source}", fn.__name__, variant, arch, options.get("num_warps", 4),
                          options.get("num_stages", 3))
                try:
                    src = triton.compiler.ASTSource(fn, full, constexprs=constexprs)
                    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(options))
                    row.shared_bytes = int(compiled.metadata.shared)
                    row.registers, row.stack_bytes, row.spill_stores, row.spill_loads = ptxas_report(
                        compiled.asm["ptx"])
                    row.check()
                except Exception as exc:  # a compile error is a result of this check, reported in its row
                    row.ok, row.error = False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
                rows.append(row)
    return rows


_FUNCTION = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _demangle(symbols: list[str]) -> list[str]:
    """C++ names without namespaces and parameter lists: ``pgd_step_l2_kernel<float, 256>``."""
    filt = shutil.which("c++filt")
    if filt is None or not symbols:
        return symbols
    out = subprocess.run([filt], input="\n".join(symbols), capture_output=True, text=True).stdout.splitlines()
    names = []
    for full in out:
        full = full.replace("(anonymous namespace)::", "").replace("fastprune::", "")
        depth, end = 0, len(full)
        for i, ch in enumerate(full):  # cut the parameter list: the first '(' outside template brackets
            depth += ch == "<"
            depth -= ch == ">"
            if ch == "(" and depth == 0:
                end = i
                break
        names.append(full[:end].replace("c10::", "").removeprefix("void "))
    return names


def cuda_resource_rows(library: str | None = None) -> list[Row]:
    """Per-kernel resources of the CUDA C++ kernels in the built extension (cuobjdump -res-usage),
    one row per kernel instantiation and architecture; [] when the extension has no CUDA code."""
    import triton

    library = library or next(iter(glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "_C*.so"))), None)
    if library is None:
        return []
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    tool = tool if os.path.exists(tool) else shutil.which("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (neither in Triton's package nor on PATH)")
    res = subprocess.run([tool, "-res-usage", library], capture_output=True, text=True)
    if res.returncode != 0:
        if "does not contain device code" in res.stderr + res.stdout:
            return []
        raise RuntimeError(f"cuobjdump failed: {res.stderr.strip()[:300]}")
    rows = []
    for section in re.split(r"Fatbin elf code:", res.stdout)[1:]:
        arch = int(re.search(r"arch = sm_(\d+)", section).group(1))
        found = _FUNCTION.findall(section)
        for name, (symbol, regs, stack, shared, local) in zip(_demangle([f[0] for f in found]), found):
            kernel, _, variant = name.partition("<")
            row = Row("csrc/cuda", kernel, "<" + variant if variant else "-", arch, registers=int(regs),
                      stack_bytes=int(stack), shared_bytes=int(shared))
            # cuobjdump has no spill counts: local memory in a kernel without local arrays is spilling.
            row.spill_stores = row.spill_loads = int(local)
            rows.append(row.check() if arch in SMEM_LIMIT else row)
    return rows


def write_csv(rows: list[Row], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow(dataclasses.asdict(row))
    os.replace(tmp, path)


def format_table(rows: list[Row]) -> str:
    lines = [f"{'kernel':34} {'variant':28} {'arch':>4} {'warps':>5} {'regs':>4} {'spill':>5} {'stack':>5} "
             f"{'smem':>7}  status"]
    for r in rows:
        lines.append(f"{r.kernel[:34]:34} {r.variant[:28]:28} {r.arch:>4} {r.num_warps:>5} {r.registers:>4} "
                     f"{r.spill_stores + r.spill_loads:>5} {r.stack_bytes:>5} {r.shared_bytes:>7}  "
                     f"{'ok' if r.ok else 'FAIL: ' + r.error}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastprune.kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results/triton-aot.csv", help="CSV table to write")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(SMEM_LIMIT))
    parser.add_argument("--module", nargs="+", default=list(MODULES), help="kernel modules to compile")
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA C++ resource report")
    args = parser.parse_args(argv)
    rows = compile_triton(args.module, args.arch)
    if not args.no_cuda:
        rows += [r for r in cuda_resource_rows() if r.arch in args.arch]
    write_csv(rows, args.out)
    print(format_table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} kernel variants compiled within limits; table: {args.out}")
    for r in failed:
        print(f"FAILED: {r.source} {r.kernel} [{r.variant}] sm_{r.arch}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
