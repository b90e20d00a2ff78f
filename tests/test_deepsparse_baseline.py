"""The DeepSparse baseline of `fastprune bench sparse`: the worker's protocol (against a stand-in
`deepsparse` package, since DeepSparse itself needs numpy < 2), finding a Python that has it, the
ONNX export of the zoo's models, and self-timed contenders in the interleaved timing."""
import sys
import textwrap

import pytest
import torch
from torch import nn

from fastprune.benchmarks.deepsparse_baseline import DeepSparseEngine, exportable, find_python
from fastprune.models import get_model
from fastprune.utils.timing import interleaved_medians

# A stand-in engine: output = 2 * input + batch_size, so the test sees that the input, the batch
# size and the output all went through the pipe.
STUB = textwrap.dedent("""
    __version__ = "0.0-stub"

    class _Engine:
        def __init__(self, batch_size):
            self.batch_size = batch_size

        def __call__(self, inputs):
            assert inputs[0].shape[0] == self.batch_size
            return [inputs[0] * 2 + self.batch_size]

    def compile_model(path, batch_size, num_cores):
        assert path.endswith(".onnx") and num_cores >= 1
        return _Engine(batch_size)
""")


@pytest.fixture
def stub_deepsparse(tmp_path, monkeypatch):
    package = tmp_path / "stub" / "deepsparse"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(STUB)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "stub"))
    return sys.executable


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()


def test_worker_runs_the_engine_behind_the_pipe(stub_deepsparse):
    pytest.importorskip("onnx")
    x = torch.randn(5, 3, 6, 6)
    with DeepSparseEngine(stub_deepsparse, small_model(), x, threads=2) as engine:
        assert engine.version == "0.0-stub"
        torch.testing.assert_close(engine.output(), x * 2 + 5)
        seconds = engine()
        assert isinstance(seconds, float) and 0 <= seconds < 5
        assert 0 <= engine(burst=4) < 5
        y = torch.randn(5, 3, 6, 6)
        engine.set_input(y)
        torch.testing.assert_close(engine.output(), y * 2 + 5)
        with pytest.raises(RuntimeError, match="unknown command"):
            engine._ask(cmd="bogus")
    assert engine._proc.poll() is not None, "closing must end the worker"


def test_find_python_names_the_argument_it_cannot_use(stub_deepsparse, monkeypatch):
    assert find_python(stub_deepsparse) == stub_deepsparse
    monkeypatch.delenv("PYTHONPATH")
    with pytest.raises(ValueError, match="--deepsparse-python"):
        find_python(sys.executable)
    monkeypatch.delenv("FASTPRUNE_DEEPSPARSE_PYTHON", raising=False)
    if "deepsparse" not in sys.modules:
        try:
            import deepsparse  # noqa: F401
        except ImportError:
            assert find_python() is None


@pytest.mark.parametrize("name", ["vgg16", "resnet18"])
def test_zoo_models_export_to_onnx(name, tmp_path):
    onnx = pytest.importorskip("onnx")
    original = get_model(name, 10, 3).eval()
    model = exportable(original)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x))  # the swapped pooling computes the same function
        path = tmp_path / f"{name}.onnx"
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=13)
    onnx.checker.check_model(str(path))


def test_self_timed_contenders_report_their_own_seconds():
    class Engine:
        reports_seconds = True

        def __call__(self, burst=1):
            assert burst == 1
            return 0.125

    times = interleaved_medians({"engine": Engine(), "plain": lambda: None}, torch.device("cpu"), repeats=3)
    assert times["engine"] == 0.125 and times["plain"] < 0.125


def test_bursts_time_the_steady_state():
    # the first call of each burst is slow (cold caches, sleeping threads): it must not count
    calls = []

    def cold_then_fast():
        calls.append(None)
        if len(calls) % 4 == 1:
            import time
            time.sleep(0.05)

    times = interleaved_medians({"f": cold_then_fast}, torch.device("cpu"), repeats=3, warmup=0, burst=4)
    assert len(calls) == 12 and times["f"] < 0.01
    with pytest.raises(ValueError, match="burst"):
        interleaved_medians({"f": cold_then_fast}, torch.device("cpu"), burst=0)


def test_the_fastest_round_ranks_candidates_through_a_passing_load():
    # Two rounds of three run while another tenant's load is on (every call 30 ms slower): by their
    # medians the candidate that suffers less from the load would win; by the fastest round, the one
    # that is faster when nothing gets in the way does.
    import time

    from fastprune.utils.timing import interleaved_fastest

    rounds = {"a": 0, "b": 0}

    def candidate(name, alone, loaded):
        def run():
            rounds[name] += 1
            time.sleep(alone if rounds[name] == 3 else loaded)  # round 3 of 3 (after one warm-up run)
        return run

    fns = {"a": candidate("a", 0.002, 0.034), "b": candidate("b", 0.010, 0.030)}
    times = interleaved_fastest(fns, torch.device("cpu"), repeats=3, warmup=1)
    assert rounds == {"a": 4, "b": 4}
    assert times["a"] < times["b"]
    rounds.update(a=0, b=0)
    medians = interleaved_medians(fns, torch.device("cpu"), repeats=3, warmup=1)
    assert medians["a"] > medians["b"]
