import json

import jax
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


def _write_idx(path, array):
    """An IDX file of uint8 data: magic 00 00 08 ndim, big-endian dims, bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    path.write_bytes(header + array.astype("uint8").tobytes())


def test_data_dir_reads_idx_and_plain_logs_without_plots(tmp_path, capsys, monkeypatch):
    """--data-dir reads any IDX dataset; off a terminal progress is plain lines; without
    matplotlib the run says "no plots written" and never claims it wrote plots."""
    from jaxopt_suite.harness import data

    ds = data.synthetic(jax.random.key(0), num_train=64, num_test=32)
    idx = tmp_path / "idx"
    idx.mkdir()
    _write_idx(idx / "train-images-idx3-ubyte", ds.train_images)
    _write_idx(idx / "train-labels-idx1-ubyte", ds.train_labels)
    _write_idx(idx / "t10k-images-idx3-ubyte", ds.test_images)
    _write_idx(idx / "t10k-labels-idx1-ubyte", ds.test_labels)

    def no_matplotlib(*args, **kwargs):
        raise ImportError("matplotlib")

    monkeypatch.setattr(cli, "plot", no_matplotlib)
    out = tmp_path / "run"
    args = ["compare", "--data-dir", str(idx), "--model", "mlp-small", "--methods", "sgd"]
    code = cli.main([*args, "--steps", "4", "--batch-size", "16", "--output", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "sgd: step 4/4 loss" in printed  # a plain line, no progress bar
    assert "no plots written" in printed and "and plots" not in printed
    results = json.loads((out / "results.json").read_text())
    assert len(results["results"][0]["history"]["loss"]) == 4
    md = (out / "compare.md").read_text()
    assert "- `sgd`: backprop, SGD lr 0.1" in md and ".png" not in md


def test_output_file_and_empty_methods_are_errors(tmp_path, capsys):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me")
    code = cli.main(["compare", "--output", str(existing), "--steps", "1"])
    assert code == 2
    assert f"--output {existing} is an existing file; give a directory" in capsys.readouterr().err
    assert existing.read_text() == "keep me"
    code = cli.main(["compare", "--output", str(tmp_path / "run"), "--methods", ""])
    assert code == 2
    assert "--methods must name at least one method" in capsys.readouterr().err


def test_pruning_row_reports_live_units_and_the_shrunk_model(tmp_path):
    """The demo's group-sparsity row: live units per layer, the parameter count of the model
    that autosize.shrink leaves (checked against the MLP's formula) and its speed-up."""
    rows = cli.compare(
        dataset="synthetic",
        model="mlp-small",
        method_names=["sgd+l21-prune"],
        steps=6,
        batch_size=16,
        output=tmp_path,
        plots=False,
        quiet=True,
    )
    row = rows[0]
    live = int(row["live_units"].split("Dense_0 ")[1].split("/")[0])
    assert row["live_units"].endswith("Dense_1 10/10")
    full = 784 * 128 + 128 + 128 * 10 + 10
    assert row["shrunk_params"] == f"{full:,} -> {784 * live + live + live * 10 + 10:,}"
    assert float(row["shrunk_speedup"].rstrip("x")) > 0
