import json

import pytest

from jaxopt_suite import cli


def test_compare_writes_table_results_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(
        [
            "compare",
            "--dataset",
            "synthetic",
            "--model",
            "mlp-small",
            "--methods",
            "sgd,adam",
            "--steps",
            "12",
            "--batch-size",
            "16",
            "--output",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "method" in printed and "vs sgd" in printed and "adam" in printed
    results = json.loads((out / "results.json").read_text())
    rows = [r["row"] for r in results["results"]]
    assert [r["method"] for r in rows] == ["sgd", "adam"]
    assert rows[0]["relative_step_time"] == pytest.approx(1.0)
    for r in rows:
        assert 0.0 <= r["test_accuracy"] <= 1.0 and r["median_step_ms"] > 0
        assert r["compiled_memory_mb"] > 0
    assert len(results["results"][0]["history"]["loss"]) == 12
    for name in ["compare.md", "loss_vs_steps.png", "loss_vs_time.png", "test_accuracy.png"]:
        assert (out / name).stat().st_size > 0
    assert "| sgd |" in (out / "compare.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "sgd,lbfgs"], "unknown method(s) ['lbfgs']; valid names: sgd, "),
        (["--dataset", "cifar"], "unknown dataset 'cifar'; valid names: mnist"),
        (["--model", "resnet"], "unknown model 'resnet'; valid names: mlp"),
    ],
)
def test_bad_names_list_the_valid_ones(tmp_path, capsys, args, message):
    code = cli.main(["compare", "--output", str(tmp_path), "--steps", "1", *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_list_shows_methods_models_datasets(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "sgd-momentum" in out and "backpack-cnn" in out and "fashion-mnist" in out
