"""The command line: the demo's quick mode end to end, and eval on the checkpoint it saves."""
import pytest

from fastprune.cli import main


def test_demo_quick_then_eval(tmp_path, capsys):
    ckpt = tmp_path / "model.pt"
    assert main(["demo", "--quick", "--quiet", "--save", str(ckpt)]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: float(line.split()[1].rstrip("%")) for line in out.splitlines()
            if line and line.split()[0] in ("clean", "fgsm", "pgd20", "worst")}
    assert set(rows) == {"clean", "fgsm", "pgd20", "worst"}
    assert rows["clean"] > 80, "adversarial training on digits should still classify well"
    assert rows["worst"] <= min(rows["clean"], rows["fgsm"], rows["pgd20"])
    assert ckpt.exists()
    assert main(["eval", "--checkpoint", str(ckpt), "--eps", "0.1", "--attacks", "clean", "fgsm",
                 "--quiet", "--json"]) == 0
    assert '"worst"' in capsys.readouterr().out


def test_eval_errors_are_reported(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["no-such-command"])
