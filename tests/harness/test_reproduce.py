import json

import numpy as np
import pytest

from jaxopt_suite import cli
from jaxopt_suite.harness import reproduce


def test_list_shows_every_target_with_its_run_times(capsys):
    assert cli.main(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    for target in reproduce.TARGETS:
        assert target.name in out
        assert f"~{target.minutes:g} min (--quick ~{target.quick_seconds:g} s)" in out


def test_every_quick_form_prints_claims_and_writes_results(tmp_path, capsys):
    """All five targets in their --quick form, one process (compilation dominates)."""
    for target in reproduce.TARGETS:
        out = tmp_path / target.name
        assert cli.main(["reproduce", target.name, "--quick", "--output", str(out)]) == 0
        printed = capsys.readouterr().out
        assert f"expected run time on 2 CPU cores: ~{target.quick_seconds:g} s" in printed
        assert "seed's claim" in printed and "ours" in printed
        results = json.loads((out / "results.json").read_text())
        assert results["target"] == target.name and results["quick"] is True
        for row in results["rows"]:
            assert row["seed"] in printed and row["ours"] in printed
        md = (out / "reproduce.md").read_text()
        assert "| result | seed's claim | ours |" in md
        pngs = sorted(p.name for p in out.glob("*.png"))
        assert pngs and all(f"![{p[:-4]}]({p})" in md for p in pngs)
        check = CHECKS[target.name]
        check(results)


def _check_diag_ggn(results):
    runs = results["data"]["accuracy_per_iteration"]
    assert len(runs) == 1 and len(runs[0]) == 6  # before the first step and after each of 5
    assert all(0.0 <= a <= 1.0 for a in runs[0])
    assert f"{100 * runs[0][-1]:.1f} %" in results["rows"][0]["ours"]


def _check_xor(results):
    data = results["data"]
    live, outputs = np.array(data["live"]), np.array(data["outputs"])
    assert live.shape == (4,) and np.all((live >= 0) & (live <= 100))
    solved = np.all(np.abs(outputs - np.array([0, 1, 1, 0])) < 0.5, axis=1)
    assert data["solved"] == solved.tolist()
    assert f"{int(solved.sum())} of 4 seeds" == results["rows"][1]["ours"]
    assert ", ".join(map(str, live)) in results["rows"][0]["ours"]


def _check_fwdgrad(results):
    for name, row in zip(["forward gradient", "backprop"], results["rows"], strict=False):
        accuracy = results["data"][name]["history"]["test_accuracy"][-1]
        assert row["ours"] == f"{accuracy:.4f} after 4 steps"


def _check_proxprop(results):
    per_epoch = results["data"]["per_epoch"]
    assert list(per_epoch) == ["backprop lr 0.05", "proxprop-exact", "proxprop"]
    for name, epoch in per_epoch.items():
        loss = np.array(results["data"]["runs"][name]["history"]["loss"])
        np.testing.assert_allclose(epoch["train_loss"], loss.reshape(2, 2).mean(axis=1))


def _check_alig(results):
    accuracy = results["data"]["test_accuracy"]
    assert set(accuracy) == {"alig", "sgd", "adam"}
    assert all(len(a) == 2 and all(0.0 <= v <= 1.0 for v in a) for a in accuracy.values())


CHECKS = {
    "backpack-diag-ggn": _check_diag_ggn,
    "autosize-xor": _check_xor,
    "fwdgrad-mnist": _check_fwdgrad,
    "proxprop-mlp": _check_proxprop,
    "alig-robustness": _check_alig,
}


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["reproduce", "mnist-sota"],
            "unknown target 'mnist-sota'; valid names: backpack-diag-ggn",
        ),
    ],
)
def test_unknown_target_lists_the_valid_ones(capsys, args, message):
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_output_that_is_a_file_is_an_error(tmp_path, capsys):
    existing = tmp_path / "x.json"
    existing.write_text("{}")
    code = cli.main(["reproduce", "autosize-xor", "--quick", "--output", str(existing)])
    assert code == 2
    assert "is an existing file; give a directory" in capsys.readouterr().err
    assert existing.read_text() == "{}"
