"""Second-order quantities against BackPACK: each relative to its own framework's gradient.

Models and batches of the first curvature benchmark: the MLP 784-1024-1024-10 at N = 128 and
BackPACK's CNN (Conv20-pool-Conv50-pool-500-10) at N = 64, same weights and MNIST batch in
both frameworks. Timed (median of interleaved rounds after compilation/warm-up):

* JAX (``--part jax``): the plain ``jax.value_and_grad`` and ``curvature.value_and_grad`` with
  one of ``diag_h``, ``diag_h_batch``, ``kfac``, ``kflr``, ``kfra`` each
  (``benchmarking.time_interleaved``); on the MLP (unless ``--no-products``) also the
  matrix-free products (``hvp``, ``ggn_vp``) and whole training steps (``sgd_step``,
  ``kfac_step`` with the engine's ``kfac`` factors, without and with the refresh of the
  inverses).
* BackPACK (``--part backpack``): PyTorch's gradient and the extensions ``DiagHessian``,
  ``BatchDiagHessian``, ``KFAC``, ``KFLR``, ``KFRA`` (and, on the MLP unless ``--no-products``, the
  ``hessianfree`` GGN/Hessian-vector products), interleaved the same way, with
  ``OMP_WAIT_POLICY=PASSIVE`` and ``torch.set_num_threads(--torch-threads)``. The parts run
  in separate processes, so torch's OpenMP threads never compete with XLA's.
* ``sqrt_ggn_exact`` / ``sqrt_ggn_mc`` (``SqrtGGNExact`` / ``SqrtGGNMC``) return C·N·P floats
  (9.5 GB for the MLP at N = 128), so both frameworks time them at N = ``--sqrt-batch``
  (default 16) against their gradient at that batch.

Each part writes ``results/products/parts/<part>_<model>.json``; ``--part summary`` merges them
into ``products_cpu.json``, a table (printed, pasted into ``results/products.md``) and a plot.
Run every timing part under the lock, one model at a time::

    LOCK="flock /tmp/jaxopt_bench.lock .venv/bin/python -m benchmarks.bench_products"
    $LOCK --part jax --model mlp
    $LOCK --part backpack --model mlp
    ... (the same for --model backpack-cnn)
    .venv/bin/python -m benchmarks.bench_products --part summary

``--quick`` runs a tiny version (small MLP, N = 8) into a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

from benchmarks import torch_models
from benchmarks.batches import mnist_batch
from jaxopt_suite import benchmarking, curvature, kronecker, train, zoo
from jaxopt_suite.curvature import products

RESULTS = Path(__file__).parent / "results" / "products"
MODELS = {"mlp": 128, "backpack-cnn": 64}
ENGINE = ("diag_h", "diag_h_batch", "kfac", "kflr", "kfra")
SQRT = ("sqrt_ggn_exact", "sqrt_ggn_mc")
BACKPACK = {
    "diag_h": "DiagHessian",
    "diag_h_batch": "BatchDiagHessian",
    "kfac": "KFAC",
    "kflr": "KFLR",
    "kfra": "KFRA",
    "sqrt_ggn_exact": "SqrtGGNExact",
    "sqrt_ggn_mc": "SqrtGGNMC",
}
# the goal: every quantity at most as slow as BackPACK's, each over its own gradient


def _setup(model_name: str):
    model = zoo.make_model(model_name)
    params = zoo.init_params(model, jax.random.key(0))
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    return apply_fn, params


def _engine_fn(apply_fn, quantity: str):
    fn = curvature.value_and_grad(apply_fn, loss="cross_entropy", quantities=(quantity,))
    return jax.jit(lambda p, x, y, k: fn(p, x, y, key=k))


def _supported(fn, args) -> str | None:
    """None when ``fn`` traces for ``args``, else the error (the engine refuses at trace)."""
    try:
        jax.eval_shape(fn, *args)
    except (ValueError, NotImplementedError) as err:
        return str(err).split("\n")[0]
    return None


def jax_part(args: argparse.Namespace) -> dict[str, Any]:
    apply_fn, params = _setup(args.model)
    key = jax.random.key(3)
    loss_fn = lambda p, x, y: train.cross_entropy(apply_fn(p, x), y)
    grad = jax.jit(jax.value_and_grad(loss_fn))
    unsupported: dict[str, str] = {}

    def group(n: int, names: tuple[str, ...], extra: dict | None = None) -> dict[str, Any]:
        x, y = mnist_batch(n)
        # the first function of each round runs right after the previous round's slowest one
        # (caches and pages cold: 30-60 % slower); a throwaway gradient takes that place
        fns = {"grad_warmup": (grad, (params, x, y)), "grad": (grad, (params, x, y))}
        for q in names:
            fn = _engine_fn(apply_fn, q)
            why = _supported(fn, (params, x, y, key))
            if why is None:
                fns[q] = (fn, (params, x, y, key))
            else:
                unsupported[q] = why
        fns.update((extra or {}) if n == args.batch_size else {})
        timings = benchmarking.time_interleaved(
            fns, baseline="grad", repeats=args.repeats, number=args.number
        )
        return {name: {**t._asdict(), "batch_size": n} for name, t in timings.items()}

    mlp = args.model.startswith("mlp") and args.products
    extra = _mlp_extras(apply_fn, loss_fn, params, key, args) if mlp else {}
    main = group(args.batch_size, tuple(q for q in ENGINE if q in args.quantities), extra)
    sqrt_names = tuple(q for q in SQRT if q in args.quantities)
    sqrt = group(args.sqrt_batch, sqrt_names) if sqrt_names else {}
    if "kfac_step" in main:
        k = args.inverse_every
        amortised = (
            main["kfac_step_refresh"]["median"] + (k - 1) * main["kfac_step"]["median"]
        ) / k
        main["kfac_step_amortised"] = {
            "median": amortised,
            "ratio": amortised / main["grad"]["median"],
            "batch_size": args.batch_size,
        }
    sqrt = {_sqrt_name(name): t for name, t in sqrt.items()}
    return {"timings": {**main, **sqrt}, "unsupported": unsupported}


def _sqrt_name(name: str) -> str:
    return {"grad": "grad_sqrt_batch", "grad_warmup": "grad_warmup_sqrt_batch"}.get(name, name)


def _mlp_extras(apply_fn, loss_fn, params, key, args) -> dict[str, tuple]:
    """Matrix-free products and whole training steps (MLP only), same batch."""
    x, y = mnist_batch(args.batch_size)
    leaves, treedef = jax.tree.flatten(params)
    vector = jax.tree.unflatten(
        treedef,
        [
            jax.random.normal(k, p.shape)
            for k, p in zip(jax.random.split(key, len(leaves)), leaves, strict=True)
        ],
    )
    sgd = optax.sgd(0.1)
    kfac = kronecker.kfac_sgd(0.1, damping=1e-2, inverse_every=args.inverse_every)
    kfac_fn = curvature.value_and_grad(apply_fn, loss="cross_entropy", quantities=("kfac",))

    def sgd_step(p, state, inputs, labels):
        value, grads = jax.value_and_grad(loss_fn)(p, inputs, labels)
        updates, state = sgd.update(grads, state, p)
        return optax.apply_updates(p, updates), state, value

    def kfac_step(p, state, inputs, labels, k):
        value, grads, extras = kfac_fn(p, inputs, labels, key=k)
        updates, state = kfac.update(grads, state, p, factors=extras["kfac"])
        return optax.apply_updates(p, updates), state, value

    # state0 is due for a refresh of the inverses (first update); state1 is not (count 1)
    state0 = kfac.init(params)
    state1 = jax.jit(kfac_step)(params, state0, x, y, key)[1]
    return {
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
        "sgd_step": (jax.jit(sgd_step), (params, sgd.init(params), x, y)),
        "kfac_step": (jax.jit(kfac_step), (params, state1, x, y, key)),
        "kfac_step_refresh": (jax.jit(kfac_step), (params, state0, x, y, key)),
    }


# ---------------------------------------------------------------------------------------------
# BackPACK


def _torch_model(model_name: str, params):
    """The zoo model in PyTorch with the same weights (flax (in, out) / HWIO layouts)."""
    import torch

    t = lambda a: torch.tensor(np.asarray(a))
    if model_name == "backpack-cnn":
        net = torch_models.backpack_cnn()
        with torch.no_grad():
            for layer, name in ((net[0], "Conv_0"), (net[3], "Conv_1")):
                layer.weight.copy_(t(params[name]["kernel"]).permute(3, 2, 0, 1))
                layer.bias.copy_(t(params[name]["bias"]))
            # flax flattens (H, W, C) and torch (C, H, W): reorder the first Dense's rows
            k0 = t(params["Dense_0"]["kernel"]).reshape(4, 4, 50, 500).permute(2, 0, 1, 3)
            net[7].weight.copy_(k0.reshape(800, 500).T)
            net[7].bias.copy_(t(params["Dense_0"]["bias"]))
            net[9].weight.copy_(t(params["Dense_1"]["kernel"]).T)
            net[9].bias.copy_(t(params["Dense_1"]["bias"]))
        return net
    names = sorted(params, key=lambda s: int(s.split("_")[1]))
    layers: list[Any] = [torch.nn.Flatten()]
    for i, name in enumerate(names):
        kernel = params[name]["kernel"]
        linear = torch.nn.Linear(*kernel.shape)
        with torch.no_grad():
            linear.weight.copy_(t(kernel).T)
            linear.bias.copy_(t(params[name]["bias"]))
        layers.append(linear)
        if i < len(names) - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def backpack_part(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch
    from backpack import backpack, extend, extensions
    from backpack.hessianfree.ggnvp import ggn_vector_product
    from backpack.hessianfree.hvp import hessian_vector_product

    torch.set_num_threads(args.torch_threads)
    # BackPACK's module hooks warn when the inputs need no gradient; that is intended here
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    _, params = _setup(args.model)
    net = extend(_torch_model(args.model, params))
    loss_fn = extend(torch.nn.CrossEntropyLoss())
    torch_params = list(net.parameters())
    unsupported: dict[str, str] = {}
    first: dict[str, float] = {}  # seconds of each extension's first (untimed) call

    def inputs(n):
        x, y = mnist_batch(n)
        return torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous(), torch.tensor(
            np.asarray(y), dtype=torch.long
        )

    def grad(x, y):
        def run():
            for p in torch_params:
                p.grad = None
            loss_fn(net(x), y).backward()

        return run

    def extension(name, x, y):
        def run():
            for p in torch_params:
                p.grad = None
            loss = loss_fn(net(x), y)
            with backpack(getattr(extensions, BACKPACK[name])()):
                loss.backward()

        return run

    def group(n, names, extra=None):
        x, y = inputs(n)
        fns = {"grad_warmup": grad(x, y), "grad": grad(x, y)}  # as in the JAX part
        for q in names:
            fn = extension(q, x, y)
            start = time.perf_counter()
            try:
                with _time_limit(args.call_limit):
                    fn()
            except _TooSlow:
                unsupported[q] = f"too slow: one call exceeded {args.call_limit} s (not timed)"
                continue
            except (NotImplementedError, RuntimeError, ValueError, AttributeError) as err:
                unsupported[q] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                continue
            first[q] = time.perf_counter() - start
            fns[q] = fn
        fns.update({k: make(x, y) for k, make in (extra or {}).items()})
        return _interleave(fns, args.repeats, args.number)

    vector = [torch.randn_like(p) for p in torch_params]

    def ggn_vp(x, y):
        def run():
            out = net(x)
            ggn_vector_product(loss_fn(out, y), out, net, vector)

        return run

    def hvp(x, y):
        return lambda: hessian_vector_product(loss_fn(net(x), y), torch_params, vector)

    mlp = args.model.startswith("mlp") and args.products
    extra = {"hvp": hvp, "ggn_vp": ggn_vp} if mlp else None
    main = group(args.batch_size, tuple(q for q in ENGINE if q in args.quantities), extra)
    sqrt_names = tuple(q for q in SQRT if q in args.quantities)
    sqrt = group(args.sqrt_batch, sqrt_names) if sqrt_names else {}
    sqrt = {_sqrt_name(name): t for name, t in sqrt.items()}
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "timings": {**main, **sqrt},
        "unsupported": unsupported,
        "first_call_s": first,
    }


class _TooSlow(Exception):
    """An extension's first call ran past ``--call-limit``."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raises :class:`_TooSlow` in the main thread after ``seconds`` (SIGALRM; BackPACK's
    extensions return to Python between modules, where the signal is handled)."""

    def alarm(signum, frame):
        raise _TooSlow

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _interleave(fns: dict, repeats: int, number: int, warmup: int = 2) -> dict[str, Any]:
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(number):
                fn()
            if r >= warmup:
                samples[name].append((time.perf_counter() - start) / number)
    base = float(np.median(samples["grad"]))
    return {
        name: {"median": float(np.median(s)), "ratio": float(np.median(s)) / base, "samples": s}
        for name, s in samples.items()
    }


# ---------------------------------------------------------------------------------------------
# summary

LABELS = {
    "grad": "gradient (N as above)",
    "diag_h": "diag_h / DiagHessian",
    "diag_h_batch": "diag_h_batch / BatchDiagHessian",
    "kfac": "kfac / KFAC (1 MC sample)",
    "kflr": "kflr / KFLR",
    "kfra": "kfra / KFRA",
    "hvp": "Hessian-vector product",
    "ggn_vp": "GGN-vector product",
    "sgd_step": "SGD step (grad + update)",
    "kfac_step": "KFAC step, no inverse refresh",
    "kfac_step_refresh": "KFAC step with inverse refresh",
    "kfac_step_amortised": "KFAC step amortised (inverse_every)",
    "grad_sqrt_batch": "gradient at the sqrt batch",
    "sqrt_ggn_exact": "sqrt_ggn_exact / SqrtGGNExact",
    "sqrt_ggn_mc": "sqrt_ggn_mc / SqrtGGNMC (1 sample)",
}


def table(model: dict[str, Any]) -> str:
    """Markdown table with both readings of the goal "at most as slow as BackPACK's": the
    absolute one of issue 5 (JAX ms / BackPACK ms <= 1, same machine) and the stricter one
    relative to each framework's own gradient (JAX / JAX grad over BackPACK / torch grad)."""
    jx = model["jax"]["timings"]
    bp = (model.get("backpack") or {}).get("timings", {})
    lines = [
        "| quantity | N | JAX ms | JAX / JAX grad | BackPACK ms | BackPACK / torch grad | "
        "JAX ms / BackPACK ms | goal (absolute) | ratio JAX / ratio BackPACK | "
        "goal (over own grad) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    verdict = lambda r: "met" if r <= 1.0 else "**missed**"
    names = [n for n in dict.fromkeys([*jx, *bp]) if not n.startswith("grad_warmup")]
    for name in names:
        t, o = jx.get(name), bp.get(name)
        n = (t or {}).get("batch_size", "")
        if n == "" and name in ("grad_sqrt_batch", *SQRT):
            n = model["sqrt_batch"]
        elif n == "":
            n = model["batch_size"]
        cells = [LABELS.get(name, name), str(n)]
        cells += [f"{1e3 * t['median']:.1f}", f"{t['ratio']:.2f}"] if t else ["-", "-"]
        cells += [f"{1e3 * o['median']:.1f}", f"{o['ratio']:.2f}"] if o else ["-", "-"]
        if t and o:
            absolute = t["median"] / o["median"]
            rel = t["ratio"] / o["ratio"]
            if name in ("grad", "grad_sqrt_batch"):
                cells += [f"{absolute:.2f}", "", "-", ""]
            else:
                cells += [f"{absolute:.2f}", verdict(absolute), f"{rel:.2f}", verdict(rel)]
        else:
            why = model["jax"]["unsupported"].get(name) if not t else None
            side = "JAX" if why else "BackPACK"
            why = why or ((model.get("backpack") or {}).get("unsupported", {}).get(name))
            note = f"{side}: {why[:90]}" if why else "not timed"
            cells += ["-", note, "-", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(models: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 3.8), squeeze=False)
    for ax, (name, model) in zip(axes[0], models.items(), strict=True):
        jx = model["jax"]["timings"]
        bp = (model.get("backpack") or {}).get("timings", {})
        names = [n for n in (*ENGINE, *SQRT, "hvp", "ggn_vp") if n in jx or n in bp]
        pos = np.arange(len(names))
        get = lambda d, n: d[n]["ratio"] if n in d else np.nan
        ax.bar(pos - 0.2, [get(jx, n) for n in names], 0.4, label="JAX / JAX grad")
        ax.bar(pos + 0.2, [get(bp, n) for n in names], 0.4, label="BackPACK / torch grad")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(pos, names, rotation=30, ha="right")
        ax.set_ylabel("time / own gradient time")
        ax.set_title(f"{name}, N = {model['batch_size']} (sqrt_ggn: N = {model['sqrt_batch']})")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(out_dir: Path) -> dict[str, Any]:
    parts = out_dir / "parts"
    models: dict[str, Any] = {}
    for path in sorted(parts.glob("*.json")):
        part = json.loads(path.read_text())
        entry = models.setdefault(
            part["model"],
            {"batch_size": part["batch_size"], "sqrt_batch": part["sqrt_batch"]},
        )
        # split runs (--tag) add their quantities; each ratio is over its own run's gradient;
        # the gradient rows shown are those of the first part (file order: untagged, _a, ...)
        slot = entry.setdefault(part["part"], {"timings": {}, "unsupported": {}})
        for field, value in part["result"].items():
            if isinstance(value, dict) and field in slot:
                kept = {k: v for k, v in value.items() if not k.startswith("grad")}
                slot[field].update({**value, **slot[field], **kept})
            else:
                slot[field] = value
        entry.setdefault("commands", []).append(part["command"])
        entry.setdefault("load", []).append(part["load_before"])
    result = {"models": models}
    benchmarking.write_json(out_dir / f"products_{jax.default_backend()}.json", result)
    plot(models, out_dir / f"products_{jax.default_backend()}.png")
    for name, model in models.items():
        if "jax" in model:
            print(f"\n### {name}, N = {model['batch_size']}\n")
            print(table(model))
    return result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("jax", "backpack", "summary"), default="jax")
    parser.add_argument("--model", default="mlp", choices=(*MODELS, "mlp-small"))
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 MLP, 64 CNN")
    parser.add_argument("--sqrt-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--quantities",
        nargs="*",
        default=[*ENGINE, *SQRT],
        choices=[*ENGINE, *SQRT],
        help="none: only the gradient (and the MLP's products and training steps)",
    )
    parser.add_argument("--tag", default="", help="suffix of the part file (split runs)")
    parser.add_argument(
        "--no-products",
        dest="products",
        action="store_false",
        help="MLP: skip the matrix-free products and the SGD/KFAC training steps",
    )
    parser.add_argument("--number", type=int, default=1)
    parser.add_argument("--inverse-every", type=int, default=10)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--call-limit",
        type=float,
        default=60.0,
        help="BackPACK: seconds one call of an extension may take before it is reported as "
        "too slow and left out (BackPACK's KFRA on the CNN)",
    )
    parser.add_argument("--output", type=Path, default=None, help="results directory")
    parser.add_argument("--quick", action="store_true", help="tiny sanity run into a temp dir")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.batch_size, args.sqrt_batch, args.repeats = "mlp-small", 8, 4, 2
    args.batch_size = args.batch_size or MODELS.get(args.model, 128)
    out_dir = args.output or (Path(tempfile.mkdtemp()) if args.quick else RESULTS)
    if args.part == "summary":
        summary(out_dir)
        return
    load = os.getloadavg()
    result = jax_part(args) if args.part == "jax" else backpack_part(args)
    payload = {
        "command": " ".join(["python -m benchmarks.bench_products", *argv]),
        "part": args.part,
        "model": args.model,
        "batch_size": args.batch_size,
        "sqrt_batch": args.sqrt_batch,
        "load_before": load,
        "load_after": os.getloadavg(),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "result": result,
    }
    path = benchmarking.write_json(
        out_dir / "parts" / f"{args.part}_{args.model}{args.tag}.json", payload
    )
    for name, t in result["timings"].items():
        print(f"{name:>22}: {1e3 * t['median']:9.2f} ms  x{t['ratio']:6.2f}", flush=True)
    for name, why in result["unsupported"].items():
        print(f"{name:>22}: unsupported ({why[:120]})")
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
