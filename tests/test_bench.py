"""The training benchmark runs end to end in its quick mode and writes every loop and ratio."""
import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_train_benchmark_quick(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "train.py"), "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "train-cpu-quick.csv")))
    loops = {r["loop"]: r for r in rows}
    assert {"hydra-paper", "hydra-fastprune", "pwoa-paper", "pwoa-fastprune", "pwoa-admm"} <= set(loops)
    assert all(float(loops[k]["epoch_s"]) > 0 for k in loops if k != "ratio")
    ratios = [r for r in rows if r["loop"] == "ratio"]
    assert len(ratios) == 4 and all(float(r["value"]) > 0 for r in ratios)
    assert rows[0]["device"]  # the machine is named
