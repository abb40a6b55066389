"""BackPACK quantities: time relative to the plain gradient, memory, and BackPACK side by side.

For each model (the BackPACK CNN at N = 64, the MLP 784-1024-1024-10 at N = 128) and each
quantity, ``curvature.value_and_grad`` with that one quantity is timed against the plain
``jax.value_and_grad`` of the same loss, interleaved (``benchmarking.time_interleaved``), with
the compiled memory of each. When torch and backpack-for-pytorch are installed, the same
model (same weights) and batch run through BackPACK's extension for the same quantity, and a
second interleaved round times JAX and BackPACK calls together for the absolute comparison.

    flock /tmp/jaxopt_bench.lock .venv/bin/python -m benchmarks.bench_curvature
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxopt_suite import benchmarking, curvature, train, zoo
from jaxopt_suite import data as data_lib

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
# Goals of the issue: ratio to the plain gradient.
GOALS = {
    "grad_batch": 1.5,
    "batch_l2": 1.5,
    "sum_grad_squared": 1.5,
    "variance": 1.5,
    "diag_ggn_mc": 1.5,
    "diag_ggn_exact": 4.0,
}
OUT = Path(__file__).parent / "results"


def _batch(n: int) -> tuple[jax.Array, jax.Array]:
    try:
        ds = data_lib.load_mnist()
        images, labels = ds.train_images[:n], ds.train_labels[:n]
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (n, 28, 28), np.uint8)
        labels = rng.integers(0, 10, n).astype(np.int32)
    return data_lib.normalize(jnp.asarray(images)), jnp.asarray(labels)


def _jax_functions(model_name: str, n: int, quantities: tuple[str, ...]):
    model = zoo.make_model(model_name)
    params = zoo.init_params(model, jax.random.key(0))
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    x, y = _batch(n)
    key = jax.random.key(1)
    plain = jax.jit(
        lambda p, x, y: jax.value_and_grad(lambda p: train.cross_entropy(apply_fn(p, x), y))(p)
    )
    fns = {"grad": (plain, (params, x, y))}
    for q in quantities:
        fn = curvature.value_and_grad(apply_fn, loss="cross_entropy", quantities=(q,))
        fns[q] = (jax.jit(lambda p, x, y, k, fn=fn: fn(p, x, y, key=k)), (params, x, y, key))
    return fns, params, x, y


def _torch_functions(
    model_name: str, params, x, y, quantities: tuple[str, ...], threads: int | None = None
):
    """BackPACK on the same model, weights and batch; None when torch/backpack are missing."""
    try:
        import backpack
        import backpack.extensions as ext
        import torch
    except ImportError:
        return None
    # XLA's CPU backend uses every core; so does torch by default
    torch.set_num_threads(threads or os.cpu_count() or 1)
    # BackPACK's hooks fire on module outputs when the inputs need no gradient: expected here
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    t = lambda a: torch.tensor(np.asarray(a))
    if model_name == "backpack-cnn":
        net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 20, 5),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2, 2),
            torch.nn.Conv2d(20, 50, 5),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2, 2),
            torch.nn.Flatten(),
            torch.nn.Linear(800, 500),
            torch.nn.ReLU(),
            torch.nn.Linear(500, 10),
        )
        convs, denses = [net[0], net[3]], [net[7], net[9]]
        with torch.no_grad():
            for layer, name in zip(convs, ["Conv_0", "Conv_1"], strict=True):
                layer.weight.copy_(t(params[name]["kernel"]).permute(3, 2, 0, 1))
                layer.bias.copy_(t(params[name]["bias"]))
            # flax flattens (H, W, C), torch (C, H, W): permute the first Dense's rows
            k = t(params["Dense_0"]["kernel"]).reshape(4, 4, 50, 500).permute(2, 0, 1, 3)
            denses[0].weight.copy_(k.reshape(800, 500).T)
            denses[0].bias.copy_(t(params["Dense_0"]["bias"]))
            denses[1].weight.copy_(t(params["Dense_1"]["kernel"]).T)
            denses[1].bias.copy_(t(params["Dense_1"]["bias"]))
        inputs = t(x).permute(0, 3, 1, 2).contiguous()
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
                layer.weight.copy_(t(params[name]["kernel"]).T)
                layer.bias.copy_(t(params[name]["bias"]))
        inputs = t(x).permute(0, 3, 1, 2).contiguous()
    targets = torch.tensor(np.asarray(y), dtype=torch.long)
    net = backpack.extend(net)
    loss_fn = backpack.extend(torch.nn.CrossEntropyLoss())

    def make(extension: str | None) -> Callable[[], None]:
        def call() -> None:
            for p in net.parameters():
                p.grad = None
            loss = loss_fn(net(inputs), targets)
            if extension is None:
                loss.backward()
            else:
                with backpack.backpack(getattr(ext, extension)()):
                    loss.backward()

        return call

    fns = {"grad": make(None)}
    fns.update({q: make(BACKPACK_EXTENSIONS[q]) for q in quantities})
    return fns


class _Eager:
    """A plain callable dressed as a jitted function for ``benchmarking.time_interleaved``
    (``lower(...).compile()`` returns itself; no XLA memory analysis), so BackPACK's calls are
    interleaved with the JAX ones in the same rounds."""

    def __init__(self, fn: Callable[[], None]):
        self.fn = fn

    def lower(self, *args):
        return self

    def compile(self):
        return self

    def memory_analysis(self):
        return None

    def __call__(self, *args):
        return self.fn()


def run_model(
    model_name: str, n: int, quantities, repeats: int, number: int, torch_threads: int | None
) -> dict:
    fns, params, x, y = _jax_functions(model_name, n, quantities)
    print(f"--- {model_name}, N = {n}", flush=True)
    torch_fns = _torch_functions(model_name, params, x, y, quantities, torch_threads)
    timed = dict(fns)
    if torch_fns is not None:
        timed.update({f"backpack:{name}": (_Eager(f), ()) for name, f in torch_fns.items()})
    timings = benchmarking.time_interleaved(timed, baseline="grad", repeats=repeats, number=number)
    grad_mem = timings["grad"].memory["total"]
    result = {"model": model_name, "batch_size": n, "jax": {}, "backpack": {}}
    for name in fns:
        tm = timings[name]
        entry = {
            "median_s": tm.median,
            "ratio": tm.ratio,
            "memory": tm.memory,
            "memory_ratio": tm.memory["total"] / grad_mem,
            "samples_s": tm.samples,
        }
        bp = timings.get(f"backpack:{name}")
        line = f"{name:>22}: {tm.median * 1e3:8.2f} ms  x{tm.ratio:5.2f} grad"
        if bp is not None:
            entry["vs_backpack"] = tm.median / bp.median
            result["backpack"][name] = {"median_s": bp.median, "samples_s": bp.samples}
            line += f"  BackPACK {bp.median * 1e3:8.2f} ms  jax/backpack {entry['vs_backpack']:.2f}"
        result["jax"][name] = entry
        print(line + f"  memory x{entry['memory_ratio']:5.2f}", flush=True)
    return result


def _markdown(results: list[dict], command: str) -> str:
    lines = [
        "# Curvature quantities (BackPACK for JAX): timing and memory",
        "",
        f"Command: `{command}`",
        "",
        "Goals (issue 5): every quantity at most as slow as BackPACK's (jax/backpack <= 1.0); "
        "first-order quantities and `diag_ggn_mc` <= 1.5x the plain JAX gradient, "
        "`diag_ggn_exact` <= 4x; MLP compiled memory of `sum_grad_squared` < 2x the gradient's.",
        "",
    ]
    for res in results:
        jx = res["jax"]
        lines += [
            f"## {res['model']}, N = {res['batch_size']}",
            "",
            "| quantity | JAX ms | x plain grad | goal | BackPACK ms | JAX / BackPACK | "
            "memory x grad |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, t in jx.items():
            goal = GOALS.get(name)
            met = (
                ""
                if goal is None
                else (f"<= {goal} " + ("met" if t["ratio"] <= goal else "**missed**"))
            )
            bp = res["backpack"].get(name, {}).get("median_s")
            vs = t.get("vs_backpack")
            lines.append(
                f"| {name} | {t['median_s'] * 1e3:.2f} | {t['ratio']:.2f} | {met} | "
                + (f"{bp * 1e3:.2f} | {vs:.2f} |" if bp else "- | - |")
                + f" {t['memory_ratio']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--quantities", nargs="+", default=list(QUANTITIES), choices=QUANTITIES)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--number", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=None, help="default: all cores")
    parser.add_argument("--quick", action="store_true", help="3 repeats of 1 call, small batch")
    parser.add_argument("--output", default=str(OUT / "curvature"))
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.number = 3, 1
    results = []
    for name in args.models:
        n = 8 if args.quick else MODELS[name]
        results.append(
            run_model(
                name, n, tuple(args.quantities), args.repeats, args.number, args.torch_threads
            )
        )
    out = Path(args.output)
    benchmarking.write_json(out / "timings.json", {"results": results, "args": vars(args)})
    if not args.quick:
        command = (
            "flock /tmp/jaxopt_bench.lock .venv/bin/python -m benchmarks.bench_curvature "
            + " ".join(argv or [])
        )
        (out.parent / "curvature.md").write_text(_markdown(results, command.strip()))
    print(f"wrote {out / 'timings.json'}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
