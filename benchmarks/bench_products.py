"""Matrix-free products and Kronecker-factored steps: time relative to a plain gradient.

On the MLP 784-1024-1024-10 with a batch of N = 128 (the issue's measurement), timed
interleaved after compilation (``benchmarking.time_interleaved``), every ratio over the plain
``jax.value_and_grad`` of the mini-batch loss:

* ``hvp``: :func:`~jaxopt_suite.curvature.products.hessian_vector_product` (forward-over-reverse);
* ``ggn_vp``: :func:`~jaxopt_suite.curvature.products.ggn_vector_product`;
* ``kfac_factors`` / ``kflr_factors``: loss, gradient and Kronecker factors in one pass
  (:func:`~jaxopt_suite.kronecker.mlp_value_grad_and_factors`, 1 MC column / the 10 exact ones);
* ``sgd_step``, ``kfac_step``, ``kfac_step_refresh``: a whole training step (gradient + update)
  of SGD and of ``kfac_sgd`` (MC factors), without and with the refresh of the inverses; the
  amortised KFAC step for ``inverse_every = k`` is ``(refresh + (k - 1) step) / k``.

With the ``compare`` extra installed, BackPACK's ``KFAC``/``KFLR`` extensions and its
``hessianfree`` GGN/Hessian-vector products are timed on the same architecture and batch in the
same run (their own interleaved loop, ratios over PyTorch's gradient). Run it under the lock::

    flock /tmp/jaxopt_bench.lock .venv/bin/python -m benchmarks.bench_products

Raw results: ``benchmarks/results/products/products.json`` and a plot beside it; the summary
``benchmarks/results/products.md`` quotes them. ``--quick`` runs a tiny version into a
temporary directory.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from jaxopt_suite import benchmarking, kronecker, train, zoo
from jaxopt_suite.curvature import products

RESULTS = Path(__file__).parent / "results" / "products"


def command_line(argv: list[str]) -> str:
    return " ".join(["python -m benchmarks.bench_products", *argv])


def jax_timings(args: argparse.Namespace) -> dict[str, Any]:
    """Every JAX function on the same parameters and batch, interleaved."""
    model = zoo.make_model(args.model)
    params = zoo.init_params(model, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (args.batch_size, 28, 28, 1))
    y = jax.random.randint(jax.random.key(2), (args.batch_size,), 0, 10)
    key = jax.random.key(3)
    leaves, treedef = jax.tree.flatten(params)
    vector = jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(k, p.shape)
            for k, p in zip(jax.random.split(key, len(leaves)), leaves, strict=True)
        ],
    )
    apply_fn = lambda p, inputs: model.apply({"params": p}, inputs)
    loss_fn = lambda p, inputs, labels: train.cross_entropy(apply_fn(p, inputs), labels)

    sgd = optax.sgd(args.learning_rate)
    kfac = kronecker.kfac_sgd(
        args.learning_rate, damping=args.damping, inverse_every=args.inverse_every
    )

    def sgd_step(p, state, inputs, labels):
        value, grads = jax.value_and_grad(loss_fn)(p, inputs, labels)
        updates, state = sgd.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    def kfac_step(p, state, inputs, labels, k):
        value, grads, factors = kronecker.mlp_value_grad_and_factors(
            p, inputs, labels, key=k, mc_samples=1
        )
        updates, state = kfac.update(grads, state, p, factors=factors)
        return optax.apply_updates(p, updates), state, value

    # state0 is due for a refresh of the inverses (first update); state1 is not (count 1)
    state0 = kfac.init(params)
    state1 = jax.jit(kfac_step)(params, state0, x, y, key)[1]
    fns = {
        "grad": (jax.jit(jax.value_and_grad(loss_fn)), (params, x, y)),
        "hvp": (
            jax.jit(lambda p, v, i, t: products.hessian_vector_product(loss_fn, p, v, i, t)),
            (params, vector, x, y),
        ),
        "ggn_vp": (
            jax.jit(
                lambda p, v, i, t: products.ggn_vector_product(
                    apply_fn, "cross_entropy", p, i, t, v
                )
            ),
            (params, vector, x, y),
        ),
        "kfac_factors": (
            jax.jit(
                lambda p, i, t, k: kronecker.mlp_value_grad_and_factors(
                    p, i, t, key=k, mc_samples=1
                )
            ),
            (params, x, y, key),
        ),
        "kflr_factors": (jax.jit(kronecker.mlp_value_grad_and_factors), (params, x, y)),
        "sgd_step": (jax.jit(sgd_step), (params, sgd.init(params), x, y)),
        "kfac_step": (jax.jit(kfac_step), (params, state1, x, y, key)),
        "kfac_step_refresh": (jax.jit(kfac_step), (params, state0, x, y, key)),
    }
    timings = benchmarking.time_interleaved(
        fns, baseline="grad", repeats=args.repeats, number=args.number
    )
    result = {name: t._asdict() for name, t in timings.items()}
    k = args.inverse_every
    amortised = (timings["kfac_step_refresh"].median + (k - 1) * timings["kfac_step"].median) / k
    result["kfac_step_amortised"] = {
        "median": amortised,
        "ratio": amortised / timings["grad"].median,
        "ratio_vs_sgd_step": amortised / timings["sgd_step"].median,
    }
    for name in ("kfac_step", "kfac_step_refresh"):
        result[name]["ratio_vs_sgd_step"] = timings[name].median / timings["sgd_step"].median
    return result


def _torch_mlp(model_name: str):
    import torch

    hidden = {"mlp": (1024, 1024), "mlp-small": (128,)}[model_name]
    sizes = (784, *hidden, 10)
    layers: list[Any] = [torch.nn.Flatten()]
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def backpack_timings(args: argparse.Namespace) -> dict[str, Any] | None:
    """BackPACK on the same architecture and batch size, its own interleaved loop."""
    if importlib.util.find_spec("backpack") is None or importlib.util.find_spec("torch") is None:
        return None
    import warnings

    import torch
    from backpack import backpack, extend
    from backpack.extensions import KFAC, KFLR
    from backpack.hessianfree.ggnvp import ggn_vector_product
    from backpack.hessianfree.hvp import hessian_vector_product

    # BackPACK's module hooks warn when the inputs need no gradient; that is intended here
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.manual_seed(0)
    model = extend(_torch_mlp(args.model))
    lossfunc = extend(torch.nn.CrossEntropyLoss())
    x = torch.randn(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))
    params = list(model.parameters())
    vector = [torch.randn_like(p) for p in params]

    def grad():
        model.zero_grad()
        lossfunc(model(x), y).backward()

    def with_extension(ext):
        def run():
            model.zero_grad()
            loss = lossfunc(model(x), y)
            with backpack(ext):
                loss.backward()

        return run

    def ggn_vp():
        out = model(x)
        ggn_vector_product(lossfunc(out, y), out, model, vector)

    def hvp():
        hessian_vector_product(lossfunc(model(x), y), params, vector)

    fns = {
        "grad": grad,
        "hvp": hvp,
        "ggn_vp": ggn_vp,
        "kfac_factors": with_extension(KFAC(mc_samples=1)),
        "kflr_factors": with_extension(KFLR()),
    }
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(2 + args.repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(args.number):
                fn()
            if r >= 2:
                samples[name].append((time.perf_counter() - start) / args.number)
    base = float(np.median(samples["grad"]))
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "timings": {
            name: {"median": float(np.median(s)), "ratio": float(np.median(s)) / base, "samples": s}
            for name, s in samples.items()
        },
    }


def table(result: dict[str, Any]) -> str:
    jx = result["jax"]
    bp = (result.get("backpack") or {}).get("timings", {})
    lines = [
        "| quantity | JAX ms | JAX / JAX grad | BackPACK ms | BackPACK / torch grad | "
        "JAX / BackPACK | JAX compiled memory (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, t in jx.items():
        ms = 1e3 * t["median"]
        mem = t.get("memory", {}).get("total")
        mem_s = f"{mem / 2**20:.1f}" if mem and mem > 0 else "-"
        other = bp.get(name)
        if other:
            bp_s = f"{1e3 * other['median']:.1f} | {other['ratio']:.2f} | "
            bp_s += f"{t['median'] / other['median']:.2f}"
        else:
            bp_s = "- | - | -"
        lines.append(f"| {name} | {ms:.1f} | {t['ratio']:.2f} | {bp_s} | {mem_s} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jx = result["jax"]
    bp = (result.get("backpack") or {}).get("timings", {})
    names = list(jx)
    fig, ax = plt.subplots(figsize=(9, 3.5))
    pos = np.arange(len(names))
    ax.bar(pos - 0.2, [jx[n]["ratio"] for n in names], 0.4, label="JAX (ours) / JAX grad")
    if bp:
        vals = [bp[n]["ratio"] if n in bp else np.nan for n in names]
        ax.bar(pos + 0.2, vals, 0.4, label="BackPACK / torch grad")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(pos, names, rotation=30, ha="right")
    ax.set_ylabel("time / gradient time")
    ax.set_title(f"{result['model']}, N = {result['batch_size']} ({jax.default_backend()})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mlp", choices=("mlp", "mlp-small"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--number", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=0.1)
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--inverse-every", type=int, default=10)
    parser.add_argument("--no-backpack", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--output", type=Path, default=None, help="results directory")
    parser.add_argument("--quick", action="store_true", help="tiny sanity run into a temp dir")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.batch_size, args.repeats, args.number = "mlp-small", 16, 2, 1
    out_dir = args.output or (Path(tempfile.mkdtemp()) if args.quick else RESULTS)

    result: dict[str, Any] = {
        "command": command_line(argv),
        "model": args.model,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "number": args.number,
        "inverse_every": args.inverse_every,
        "jax": jax_timings(args),
    }
    if not args.no_backpack:
        result["backpack"] = backpack_timings(args)
    path = benchmarking.write_json(out_dir / f"products_{jax.default_backend()}.json", result)
    plot(result, out_dir / f"products_{jax.default_backend()}.png")
    print(table(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
