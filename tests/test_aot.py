"""The ahead-of-time compile check (fastprune/kernels/aot.py): every GPU kernel variant compiles for
sm_90 and sm_80 within limits, and the check fails on a planted compile error, a spill or too much
shared memory. scripts/test.sh runs the full check (and prints its table) before the suite; these
tests cover the checker itself."""
import os
import subprocess
import sys
import textwrap

import pytest

from fastprune.kernels.aot import SMEM_LIMIT, Row

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_aot(*args, pythonpath=None):
    """The checker in a fresh process without TRITON_INTERPRET (interpreted kernels cannot compile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "fastprune.kernels.aot", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=900)


def test_the_pgd_kernels_compile_for_hopper_and_ampere(tmp_path):
    out = tmp_path / "aot.csv"
    res = run_aot("--module", "fastprune.kernels.pgd", "--no-cuda", "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    lines = out.read_text().splitlines()
    assert lines[0].startswith("source,kernel,variant,arch")
    # four kernels, four dtypes, two architectures
    assert len(lines) - 1 == 4 * 4 * 2
    assert "_pgd_l2_write_kernel" in res.stdout and " 90 " in res.stdout and " 80 " in res.stdout


def test_a_planted_compile_error_fails_the_check(tmp_path):
    (tmp_path / "broken_kernels.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def _broken_kernel(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) + undefined_name, mask=offs < n)

        @triton.jit
        def _fine_kernel(x_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

        def aot_variants():
            yield ("planted error", _broken_kernel, {"x_ptr": "*fp32", "n": "i32"}, {"BLOCK": 128}, {"num_warps": 4})
            yield ("fine", _fine_kernel, {"x_ptr": "*fp32", "n": "i32"}, {"BLOCK": 128}, {"num_warps": 4})
    '''))
    res = run_aot("--module", "broken_kernels", "--no-cuda", "--out", str(tmp_path / "aot.csv"),
                  pythonpath=str(tmp_path))
    assert res.returncode == 1
    assert "FAILED" in res.stderr and "_broken_kernel" in res.stderr and "undefined_name" in res.stderr
    assert "_fine_kernel" not in res.stderr  # the other kernel still compiled, and its row says so
    assert "2 of 4 kernel variants compiled within limits" in res.stdout


def test_spills_and_shared_memory_over_the_limit_fail_a_row():
    assert Row("k.py", "k", "v", 90, registers=255, spill_stores=4).check().ok is False
    assert Row("k.py", "k", "v", 80, shared_bytes=SMEM_LIMIT[80] + 1).check().ok is False
    assert Row("k.py", "k", "v", 90, shared_bytes=SMEM_LIMIT[80] + 1).check().ok is True  # Hopper has more
    assert Row("k.py", "k", "v", 90, registers=128, shared_bytes=48 * 1024).check().ok is True


def test_cuda_kernels_resources_are_read_from_the_extension():
    from fastprune import backends
    from fastprune.kernels.aot import cuda_resource_rows

    if not backends.extension_info()["cuda"]:
        pytest.skip("the extension was built without CUDA")
    rows = cuda_resource_rows()
    kernels = {r.kernel for r in rows}
    assert {"pgd_step_linf_kernel", "pgd_l2_write_kernel", "gram_s_kernel", "sparse_conv2d_tiled_kernel"} <= kernels
    # setup.py builds sm_80 and sm_90 unless TORCH_CUDA_ARCH_LIST names others (gpu_check.sh builds
    # for the GPU at hand only).
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    wanted = {int(float(a.replace("+PTX", "")) * 10) for a in listed.replace(" ", ";").split(";") if a}
    assert {r.arch for r in rows} >= wanted
    assert all(r.registers > 0 for r in rows)
