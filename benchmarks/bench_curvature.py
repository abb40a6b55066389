"""BackPACK quantities: time relative to the plain gradient, memory, and BackPACK side by side.

For each model (the BackPACK CNN at N = 64, the MLP 784-1024-1024-10 at N = 128) and each
quantity, ``curvature.value_and_grad`` with that one quantity is timed against the plain
``jax.value_and_grad`` of the same loss, interleaved (``benchmarking.time_interleaved``), with
the compiled memory of each.

When torch and backpack-for-pytorch are installed, BackPACK runs the same model (same weights)
on the same batch in a **separate process**, started after the JAX phase, with
``OMP_WAIT_POLICY=PASSIVE`` and ``torch.set_num_threads(--torch-threads)``: torch's OpenMP
threads and XLA's thread pool in one process spin against each other on a small machine and
distort both sides. Each side is interleaved against its *own* plain gradient (JAX quantity /
JAX grad, BackPACK extension / plain ``loss.backward()``), and the JAX / BackPACK ratio divides
the two absolute medians. The worker also returns the sum of every deterministic quantity, which
is compared with JAX's (the two compute the same numbers).

Every timed call blocks on and then drops its own outputs, so freeing a large result (the
N x P ``*_batch`` quantities) is charged to the call that made it, not to the next one.

    cmd="flock /tmp/jaxopt_bench.lock .venv/bin/python -m benchmarks.bench_curvature"
    $cmd --models mlp; $cmd --models backpack-cnn

Each invocation writes ``results/curvature/timings_<model>.json``; the markdown summary
``results/curvature.md`` is rebuilt from every such file present (``--report`` only rebuilds).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks import torch_models
from benchmarks.batches import mnist_batch

QUANTITIES = (
    "grad_batch",
    "batch_l2",
    "sum_grad_squared",
    "variance",
    "diag_ggn_exact",
    "diag_ggn_mc",
    "diag_ggn_exact_batch",
    "diag_ggn_mc_batch",
)
MODELS = {"backpack-cnn": 64, "mlp": 128}
BACKPACK_EXTENSIONS = {
    "grad_batch": "BatchGrad",
    "batch_l2": "BatchL2Grad",
    "sum_grad_squared": "SumGradSquared",
    "variance": "Variance",
    "diag_ggn_exact": "DiagGGNExact",
    "diag_ggn_mc": "DiagGGNMC",
    "diag_ggn_exact_batch": "BatchDiagGGNExact",
    "diag_ggn_mc_batch": "BatchDiagGGNMC",
}
DETERMINISTIC = (
    "grad_batch",
    "batch_l2",
    "sum_grad_squared",
    "variance",
    "diag_ggn_exact",
    "diag_ggn_exact_batch",
)
# Goals of the issue: ratio to the plain gradient.
GOALS = {
    "batch_l2": 1.5,
    "sum_grad_squared": 1.5,
    "variance": 1.5,
    "diag_ggn_mc": 1.5,
    "diag_ggn_exact": 4.0,
}
OUT = Path(__file__).parent / "results"


def _load() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " / ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _fmt_load(text: str) -> str:
    numbers = re.findall(r"\d+\.\d+", text)
    return " / ".join(f"{float(v):.1f}" for v in numbers) if numbers else text


class _Dropping:
    """``time_interleaved`` wants ``fn.lower(*args).compile()``; this hands back a callable
    that runs ``call``, waits for its outputs and drops them before returning, so their
    deallocation is timed with the call that produced them."""

    def __init__(self, call: Callable, memory: Callable[[], object] | None = None):
        self.call, self._memory = call, memory

    def lower(self, *args):
        return self

    def compile(self):
        return self

    def memory_analysis(self):
        return None if self._memory is None else self._memory()

    def __call__(self, *args):
        out = self.call(*args)
        _wait(out)
        del out
        return None


def _wait(out) -> None:
    import jax

    jax.tree.map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, out)


def _jax_side(model_name: str, n: int, quantities, repeats: int, number: int) -> dict:
    import jax

    from jaxopt_suite import benchmarking, curvature, train, zoo

    model = zoo.make_model(model_name)
    params = zoo.init_params(model, jax.random.key(0))
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    x, y = mnist_batch(n)
    key = jax.random.key(1)
    plain = jax.jit(
        lambda p, x, y: jax.value_and_grad(lambda p: train.cross_entropy(apply_fn(p, x), y))(p)
    )
    jitted = {"grad": (plain, (params, x, y))}
    for q in quantities:
        fn = curvature.value_and_grad(apply_fn, loss="cross_entropy", quantities=(q,))
        jitted[q] = (jax.jit(lambda p, x, y, k, fn=fn: fn(p, x, y, key=k)), (params, x, y, key))
    timed, sums = {}, {}
    for name, (f, args) in jitted.items():
        exe = f.lower(*args).compile()
        timed[name] = (_Dropping(exe, exe.memory_analysis), args)
        if name in DETERMINISTIC:
            sums[name] = float(
                sum(np.sum(np.asarray(v, np.float64)) for v in jax.tree.leaves(exe(*args)[2][name]))
            )
    before = _load()
    start = time.time()
    timings = benchmarking.time_interleaved(timed, baseline="grad", repeats=repeats, number=number)
    side = {
        "load_before": before,
        "load_after": _load(),
        "wall_s": time.time() - start,
        "timings": _summarise(timings, memory=True),
        "sums": sums,
    }
    return side, params, x, y


def _summarise(timings, memory: bool) -> dict:
    grad_mem = timings["grad"].memory["total"] if memory else None
    out = {}
    for name, tm in timings.items():
        entry = {
            "median_s": tm.median,
            "ratio": tm.ratio,
            "p25_s": float(np.percentile(tm.samples, 25)),
            "p75_s": float(np.percentile(tm.samples, 75)),
            "samples_s": tm.samples,
        }
        if memory:
            entry["memory"] = tm.memory
            entry["memory_ratio"] = tm.memory["total"] / grad_mem
        out[name] = entry
    return out


def _backpack_side(model_name, params, x, y, quantities, repeats, number, threads) -> dict | None:
    """Runs :func:`_backpack_worker` in a fresh process (no XLA in it) and returns its result."""
    try:
        import backpack  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return None
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        flat = {
            "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(params)
        }
        np.savez(Path(tmp) / "in.npz", x=np.asarray(x), y=np.asarray(y), **flat)
        env = dict(
            os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads), JAX_PLATFORMS="cpu"
        )
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.bench_curvature",
            "--backpack-worker",
            tmp,
            "--models",
            model_name,
            "--quantities",
            *quantities,
            "--repeats",
            str(repeats),
            "--number",
            str(number),
            "--torch-threads",
            str(threads),
        ]
        subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).parent.parent)
        return json.loads((Path(tmp) / "out.json").read_text())


def _backpack_worker(folder: str, model_name: str, quantities, repeats, number, threads) -> None:
    import backpack
    import backpack.extensions as ext
    import torch

    from jaxopt_suite import benchmarking

    torch.set_num_threads(threads)
    # BackPACK's hooks fire on module outputs when the inputs need no gradient: expected here
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    arrays = np.load(Path(folder) / "in.npz")
    t = lambda name: torch.tensor(arrays[name])
    if model_name == "backpack-cnn":
        net = torch_models.backpack_cnn()
        with torch.no_grad():
            for layer, name in zip([net[0], net[3]], ["Conv_0", "Conv_1"], strict=True):
                layer.weight.copy_(t(f"{name}/kernel").permute(3, 2, 0, 1))
                layer.bias.copy_(t(f"{name}/bias"))
            # flax flattens (H, W, C), torch (C, H, W): permute the first Dense's rows
            k = t("Dense_0/kernel").reshape(4, 4, 50, 500).permute(2, 0, 1, 3)
            net[7].weight.copy_(k.reshape(800, 500).T)
            net[7].bias.copy_(t("Dense_0/bias"))
            net[9].weight.copy_(t("Dense_1/kernel").T)
            net[9].bias.copy_(t("Dense_1/bias"))
    else:
        net = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(784, 1024),
            torch.nn.ReLU(),
            torch.nn.Linear(1024, 1024),
            torch.nn.ReLU(),
            torch.nn.Linear(1024, 10),
        )
        with torch.no_grad():
            for layer, name in zip(
                [net[1], net[3], net[5]], ["Dense_0", "Dense_1", "Dense_2"], strict=True
            ):
                layer.weight.copy_(t(f"{name}/kernel").T)
                layer.bias.copy_(t(f"{name}/bias"))
    inputs = t("x").permute(0, 3, 1, 2).contiguous()
    targets = torch.tensor(arrays["y"], dtype=torch.long)
    net = backpack.extend(net)
    loss_fn = backpack.extend(torch.nn.CrossEntropyLoss())

    def make(quantity: str | None) -> Callable[[], None]:
        def call(keep: bool = False):
            for p in net.parameters():
                p.grad = None
            loss = loss_fn(net(inputs), targets)
            if quantity is None:
                loss.backward()
                return None
            with backpack.backpack(getattr(ext, BACKPACK_EXTENSIONS[quantity])()):
                loss.backward()
            values = [getattr(p, quantity) for p in net.parameters()]
            for p in net.parameters():  # free the results inside the timed call
                delattr(p, quantity)
            return values if keep else None

        return call

    calls = {"grad": make(None)} | {q: make(q) for q in quantities}
    sums = {
        q: float(sum(v.double().sum() for v in calls[q](keep=True)))
        for q in quantities
        if q in DETERMINISTIC
    }
    before = _load()
    start = time.time()
    timings = benchmarking.time_interleaved(
        {name: (_Dropping(f), ()) for name, f in calls.items()},
        baseline="grad",
        repeats=repeats,
        number=number,
    )
    result = {
        "load_before": before,
        "load_after": _load(),
        "wall_s": time.time() - start,
        "threads": threads,
        "timings": _summarise(timings, memory=False),
        "sums": sums,
    }
    (Path(folder) / "out.json").write_text(json.dumps(result, default=_plain))


def _plain(a):
    return np.asarray(a).tolist()


def run_model(model_name, n, quantities, repeats, number, threads, side) -> dict:
    print(f"--- {model_name}, N = {n}", flush=True)
    result = {"model": model_name, "batch_size": n, "repeats": repeats, "number": number}
    jax_side, params, x, y = _jax_side(model_name, n, quantities, repeats, number)
    result["jax"] = jax_side
    result["backpack"] = (
        _backpack_side(model_name, params, x, y, quantities, repeats, number, threads)
        if side == "both"
        else None
    )
    for line in _table(result):
        print(line, flush=True)
    return result


def _ms(entry: dict) -> str:
    return f"{entry['median_s'] * 1e3:.1f} ({entry['p25_s'] * 1e3:.1f}–{entry['p75_s'] * 1e3:.1f})"


def _table(res: dict) -> list[str]:
    jx = res["jax"]["timings"]
    bp = (res.get("backpack") or {}).get("timings", {})
    lines = [
        "| quantity | JAX ms (p25–p75) | x JAX grad | goal | BackPACK ms (p25–p75) | "
        "x BackPACK grad | JAX / BackPACK | memory x grad | sums agree |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in jx.items():
        goal = GOALS.get(name)
        met = (
            "" if goal is None else f"<= {goal} " + ("met" if t["ratio"] <= goal else "**missed**")
        )
        b = bp.get(name)
        vs = t["median_s"] / b["median_s"] if b else None
        sj = res["jax"]["sums"].get(name)
        sb = (res.get("backpack") or {}).get("sums", {}).get(name)
        agree = "" if sj is None or sb is None else f"{abs(sj - sb) / max(abs(sb), 1e-30):.0e}"
        lines.append(
            f"| {name} | {_ms(t)} | {t['ratio']:.2f} | {met} | "
            + (f"{_ms(b)} | {b['ratio']:.2f} | " if b else "- | - | ")
            + ("-" if vs is None else (f"**{vs:.2f}**" if vs > 1 else f"{vs:.2f}"))
            + f" | {t['memory_ratio']:.2f} | {agree} |"
        )
    return lines


def _markdown(results: list[dict]) -> str:
    lines = [
        "# Curvature quantities (BackPACK for JAX): timing and memory",
        "",
        "Goals (issue 5): every quantity at most as slow as BackPACK's (JAX / BackPACK <= 1.0); "
        "first-order quantities and `diag_ggn_mc` <= 1.5x the plain JAX gradient, "
        "`diag_ggn_exact` <= 4x; MLP compiled memory of `sum_grad_squared` < 2x the gradient's.",
        "",
        "Each side is interleaved against its own plain gradient in its own process (JAX first, "
        "then BackPACK in a fresh subprocess with `OMP_WAIT_POLICY=PASSIVE`); medians of "
        "`repeats` rounds of `number` calls, p25–p75 of the rounds in brackets. *sums agree*: "
        "relative difference of the sum of all entries, JAX vs BackPACK (deterministic "
        "quantities).",
        "",
    ]
    for res in results:
        j, b = res["jax"], res.get("backpack") or {}
        lines += [
            f"## {res['model']}, N = {res['batch_size']}",
            "",
            f"`flock /tmp/jaxopt_bench.lock .venv/bin/python -m benchmarks.bench_curvature "
            f"--models {res['model']} --repeats {res['repeats']} --number {res['number']}`"
            f" — run {res.get('date', '?')}; load average (1, 5, 15 min) JAX phase "
            f"{_fmt_load(j['load_before'])} → {_fmt_load(j['load_after'])}"
            + (
                f", BackPACK phase ({b['threads']} torch threads) {_fmt_load(b['load_before'])}"
                f" → {_fmt_load(b['load_after'])}"
                if b
                else ""
            ),
            "",
            *_table(res),
            "",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--quantities", nargs="+", default=list(QUANTITIES), choices=QUANTITIES)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--number", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--jax-only", action="store_true", help="skip BackPACK")
    parser.add_argument("--quick", action="store_true", help="2 repeats of 1 call, small batch")
    parser.add_argument("--report", action="store_true", help="only rebuild the markdown")
    parser.add_argument("--output", default=str(OUT / "curvature"))
    parser.add_argument("--backpack-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.backpack_worker:
        _backpack_worker(
            args.backpack_worker,
            args.models[0],
            tuple(args.quantities),
            args.repeats,
            args.number,
            args.torch_threads,
        )
        return
    out = Path(args.output)
    if args.quick:
        args.repeats, args.number = 2, 1
    if not args.report:
        from jaxopt_suite import benchmarking

        for name in args.models:
            n = 8 if args.quick else MODELS[name]
            res = run_model(
                name,
                n,
                tuple(args.quantities),
                args.repeats,
                args.number,
                args.torch_threads,
                "jax" if args.jax_only else "both",
            )
            res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            if args.quick:
                continue
            path = benchmarking.write_json(
                out / f"timings_{name}.json", {"result": res, "args": vars(args)}
            )
            print(f"wrote {path}")
    found = sorted(out.glob("timings_*.json"))
    results = [json.loads(p.read_text())["result"] for p in found]
    if results and not args.quick:
        notes = out / "notes.md"  # the reading of the numbers, kept by hand
        text = _markdown(results) + ("\n" + notes.read_text() if notes.exists() else "")
        (out.parent / "curvature.md").write_text(text)
        print(f"wrote {out.parent / 'curvature.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
