"""``jaxopt-suite reproduce NAME``: each seed's headline experiment, its claim beside ours.

One function per target and ONE explicit registry, :data:`TARGETS`. A target runs its
experiment (``quick=True``: a tiny form of the same code path, a smoke run rather than a
measurement) and returns a :class:`Report`: rows ``{"result", "seed", "ours"}`` (the seed's
claim quoted as it is written, our number beside it), the settings, the raw data for
``results.json`` and a plotting function. :func:`reproduce` prints the table and writes
``results.json``, ``reproduce.md`` and the plots to the output directory.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_suite import alig, autosize, fwdgrad, group_sparsity, precondition
from jaxopt_suite.harness import benchmarking, cli, recipes, train, zoo
from jaxopt_suite.harness import data as data_lib


class Report(NamedTuple):
    """What a target returns: the claim table, its settings, raw data, and its plots."""

    rows: list[dict[str, str]]  # {"result", "seed", "ours"}
    settings: dict[str, Any]
    data: dict[str, Any]
    plot: Callable[[Path], list[Path]]


@dataclasses.dataclass(frozen=True)
class Target:
    """One reproducible seed result.

    Attributes:
      name: the command-line name.
      summary: what is run, one line.
      source: where the quoted claim comes from.
      minutes: expected run time of the full form on 2 CPU cores.
      quick_seconds: expected run time of ``--quick`` on 2 CPU cores, compilation included.
      run: ``quick -> Report``.
    """

    name: str
    summary: str
    source: str
    minutes: float
    quick_seconds: float
    run: Callable[[bool], Report]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _subset(dataset: data_lib.Dataset, num_train: int) -> data_lib.Dataset:
    return dataset._replace(
        train_images=dataset.train_images[:num_train], train_labels=dataset.train_labels[:num_train]
    )


def _percent(values: Sequence[float]) -> str:
    """Mean and range of fractions, in percent."""
    return (
        f"{100 * np.mean(values):.1f} % (min {100 * np.min(values):.0f} %, "
        f"max {100 * np.max(values):.0f} %)"
    )


# --- backpack-diag-ggn: BackPACK's example, seed 001 ------------------------------------------


def diag_ggn_seed_runs(
    dataset: data_lib.Dataset,
    seeds: int,
    *,
    iterations: int = 100,
    plain: bool = False,
    model_name: str = "backpack-cnn",
) -> list[list[float]]:
    """BackPACK's diag-GGN-MC example loop, once per seed; mini-batch accuracies per iteration.

    Each iteration measures the accuracy of the batch of 64 before stepping with
    ``θ ← θ − 0.01 g / (diag_ggn_mc + 1)`` (``plain``: G = 0, i.e. SGD with step 0.01, the
    longest step the preconditioned update can take entry by entry). Seed ``s`` initialises
    with key ``10 s``, draws its MC samples from ``10 s + 1`` and its batches from ``10 s + 2``.

    Returns:
      ``iterations + 1`` accuracies per seed (the last one after ``iterations`` steps).
    """
    model = zoo.make_model(model_name)
    problem = train.Problem(lambda p, x: model.apply({"params": p}, x))
    if plain:
        tx, gradient = optax.sgd(0.01), train.backprop
    else:
        tx = precondition.diag_ggn_sgd(0.01, damping=1.0)
        gradient = train.curvature_gradient("diag_ggn_mc")
    step = train.jit_step(train.make_step(problem, tx, gradient))
    accuracy = jax.jit(
        lambda p, images, labels: jnp.mean(
            problem.apply_fn(p, data_lib.normalize(images)).argmax(-1) == labels
        )
    )
    runs = []
    for seed in range(seeds):
        params = zoo.init_params(model, jax.random.key(10 * seed))
        state = train.init_state(params, tx, jax.random.key(10 * seed + 1))
        batches = train.epochs(
            jax.random.key(10 * seed + 2), dataset.train_images, dataset.train_labels, 64
        )
        accs = []
        for _ in range(iterations + 1):
            images, labels = next(batches)
            accs.append(accuracy(state.params, images, labels))  # read back once, below
            state, _ = step(state, images, labels)
        runs.append([float(a) for a in jax.device_get(accs)])
        print(f"seed {seed}: last-10 mean accuracy {np.mean(runs[-1][-10:]):.3f}", flush=True)
    return runs


def backpack_diag_ggn(quick: bool) -> Report:
    """Seed 001: the BackPACK CNN on MNIST, batch 64, diag-GGN-MC SGD (step 0.01, damping 1),
    100 iterations, over 5 seeds (``quick``: 1 seed, 5 iterations of the MLP 784-128-10 on the
    synthetic set)."""
    seeds, iterations = (1, 5) if quick else (5, 100)
    model_name = "mlp-small" if quick else "backpack-cnn"
    dataset = data_lib.load("synthetic" if quick else "mnist")
    runs = diag_ggn_seed_runs(dataset, seeds, iterations=iterations, model_name=model_name)
    last = [r[-1] for r in runs]
    last10 = [float(np.mean(r[-10:])) for r in runs]
    rows = [
        {
            "result": f"mini-batch accuracy after {iterations} iterations",
            "seed": "Iteration 100/100   Minibatch Loss 0.173   Accuracy 95%",
            "ours": f"{_percent(last)} over {seeds} seeds",
        },
        {
            "result": "mean of the last 10 iterations",
            "seed": "Accuracy 86%, 89%, 94%, 89%, 95% (its iterations 96-100)",
            "ours": f"{_percent(last10)} over {seeds} seeds",
        },
    ]

    def plot(output: Path) -> list[Path]:
        fig, ax = _pyplot().subplots(figsize=(6, 4))
        for seed, accs in enumerate(runs):
            ax.plot(accs, label=f"seed {seed}")
        ax.set(
            xlabel="iteration",
            ylabel="mini-batch accuracy (before the step)",
            title=f"diag-GGN-MC SGD, {model_name}, {'synthetic' if quick else 'MNIST'}",
        )
        ax.legend(fontsize="small")
        return [_save(fig, output / "accuracy.png")]

    settings = {
        "dataset": "synthetic" if quick else "mnist",
        "model": model_name,
        "batch_size": 64,
        "step": 0.01,
        "damping": 1.0,
        "iterations": iterations,
        "seeds": seeds,
    }
    return Report(rows, settings, {"accuracy_per_iteration": runs}, plot)


# --- autosize-xor: ProxGradPytorch's XOR example, seed 004 -------------------------------------

_XOR_INPUTS = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], np.float32)
_XOR_TARGETS = np.array([0, 1, 1, 0], np.float32)


def _xor_apply(params: dict, x: jax.Array) -> jax.Array:
    hidden = jax.nn.relu(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return (hidden @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"])[..., 0]


def _uniform_fan_in(key: jax.Array, fan_in: int, fan_out: int) -> dict:
    """PyTorch's ``nn.Linear`` default: weight and bias uniform in ±1/√fan_in."""
    bound = 1.0 / math.sqrt(fan_in)
    k_kernel, k_bias = jax.random.split(key)
    return {
        "kernel": jax.random.uniform(k_kernel, (fan_in, fan_out), minval=-bound, maxval=bound),
        "bias": jax.random.uniform(k_bias, (fan_out,), minval=-bound, maxval=bound),
    }


def xor_autosize_runs(
    seeds: int, epochs: int, *, hidden: int = 100, reg: float = 0.005
) -> tuple[np.ndarray, np.ndarray]:
    """ProxGradPytorch's XOR auto-sizing example, ``seeds`` runs in one vmapped ``lax.scan``.

    Net 2-``hidden``-1 with ReLU, PyTorch's default initialisation, summed squared error on one
    sample at a time (the four in order, ``epochs`` times), SGD lr 0.01, then after every step
    the linf1 group prox (strength ``reg``, prox learning rate 0.1) on the hidden neurons.

    Returns:
      ``(live, predictions)``: live hidden neurons per seed ``(seeds,)`` and the trained nets'
      outputs on the four inputs ``(seeds, 4)``.
    """
    tx = optax.chain(
        optax.sgd(0.01),
        group_sparsity(reg, 0.1, norm="linf1", mask={"Dense_0": True, "Dense_1": False}),
    )
    inputs, targets = jnp.asarray(_XOR_INPUTS), jnp.asarray(_XOR_TARGETS)

    def run(key):
        k0, k1 = jax.random.split(key)
        params = {
            "Dense_0": _uniform_fan_in(k0, 2, hidden),
            "Dense_1": _uniform_fan_in(k1, hidden, 1),
        }

        def sample_step(carry, i):
            params, opt_state = carry
            grads = jax.grad(lambda p: jnp.sum((_xor_apply(p, inputs[i]) - targets[i]) ** 2))(
                params
            )
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), None

        order = jnp.arange(4 * epochs) % 4
        (params, _), _ = jax.lax.scan(sample_step, (params, tx.init(params)), order)
        return params

    trained = jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(0), seeds))
    live = np.array(
        [
            autosize.live_units(jax.tree.map(lambda x, s=s: x[s], trained))["Dense_0"]
            for s in range(seeds)
        ]
    )
    predictions = np.asarray(jax.vmap(_xor_apply, in_axes=(0, None))(trained, inputs))
    return live, predictions


def autosize_xor(quick: bool) -> Report:
    """Seed 004: XOR, 2-100-1, linf1 reg 0.005, 5000 epochs, 20 seeds (``quick``: 4 seeds,
    50 epochs)."""
    seeds, epochs = (4, 50) if quick else (20, 5000)
    live, predictions = xor_autosize_runs(seeds, epochs)
    solved = np.all(np.abs(predictions - _XOR_TARGETS) < 0.5, axis=1)
    rows = [
        {
            "result": "hidden neurons left of 100",
            "seed": "frequently there are around 15 of the 100 neurons (H) left.",
            "ours": f"median {np.median(live):g} (min {live.min()}, max {live.max()}) over "
            f"{seeds} seeds; per seed {', '.join(map(str, live))}",
        },
        {
            "result": "XOR solved (every output within 0.5 of its target)",
            "seed": "-",
            "ours": f"{int(solved.sum())} of {seeds} seeds",
        },
    ]

    def plot(output: Path) -> list[Path]:
        fig, ax = _pyplot().subplots(figsize=(6, 4))
        ax.hist(live, bins=np.arange(live.min(), live.max() + 2) - 0.5)
        ax.set(
            xlabel="live hidden neurons (of 100)",
            ylabel="seeds",
            title=f"XOR 2-100-1, linf1 reg 0.005, {epochs} epochs, {seeds} seeds",
        )
        return [_save(fig, output / "live_neurons.png")]

    settings = {
        "net": "2-100-1 ReLU",
        "loss": "summed squared error, one sample per step",
        "optimizer": "SGD lr 0.01",
        "prox": "linf1 per hidden neuron, reg 0.005, prox lr 0.1",
        "epochs": epochs,
        "seeds": seeds,
    }
    data = {"live": live.tolist(), "solved": solved.tolist(), "outputs": predictions.tolist()}
    return Report(rows, settings, data, plot)


# --- runs of the zoo models on MNIST, through compare's run_method -----------------------------


def _method(name: str, description: str, build: Callable[[], recipes.Setup]) -> recipes.Method:
    return recipes.Method(name, description, lambda config: build())


def _train_methods(
    methods: Sequence[recipes.Method],
    dataset: data_lib.Dataset,
    model_name: str,
    config: recipes.RunConfig,
    num_evals: int,
) -> dict[str, dict[str, Any]]:
    return {
        m.name: cli.run_method(m, dataset, model_name, config, num_evals=num_evals) for m in methods
    }


def _training_plots(results: dict[str, dict[str, Any]], output: Path, title: str) -> list[Path]:
    plt = _pyplot()
    paths = []
    for name, xkey, xlabel in [
        ("loss_vs_steps.png", None, "step"),
        ("loss_vs_time.png", "wall", "seconds in training steps"),
    ]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, r in results.items():
            loss = np.asarray(r["history"]["loss"])
            x = np.arange(1, len(loss) + 1) if xkey is None else np.asarray(r["history"][xkey])
            ax.plot(x, loss, label=method)
        ax.set(xlabel=xlabel, ylabel="mini-batch training loss", yscale="log", title=title)
        ax.legend(fontsize="small")
        paths.append(_save(fig, output / name))
    return paths


# --- fwdgrad-mnist: the forward-gradient seed's MLP, seed 003 ----------------------------------


def fwdgrad_mnist(quick: bool) -> Report:
    """Seed 003: MLP 784-1024-1024-10 on MNIST, batch 1024, SGD lr 5e-4 decayed by
    ``exp(-1e-4 t)``, forward gradient (one normal direction, as the seed) against backprop,
    16 epochs (``quick``: MLP 784-128-10, 4 steps of 64 on the synthetic set)."""
    model_name, dataset_name = ("mlp-small", "synthetic") if quick else ("mlp", "mnist")
    dataset = data_lib.load(dataset_name)
    batch_size = 64 if quick else 1024
    steps = 4 if quick else 16 * (len(dataset.train_labels) // batch_size)
    schedule = recipes.sgd_decay(5e-4)
    methods = [
        _method("backprop", "backprop, SGD", lambda: recipes.Setup(optax.sgd(schedule))),
        _method(
            "forward gradient",
            "forward gradient (dense normal direction), SGD",
            lambda: recipes.Setup(
                optax.chain(
                    fwdgrad.forward_gradient(jax.random.key(1), distribution="normal"),
                    optax.sgd(schedule),
                ),
                gradient=train.value_fn_gradient,
            ),
        ),
    ]
    config = recipes.RunConfig(steps=steps, batch_size=batch_size, seed=0)
    results = _train_methods(methods, dataset, model_name, config, num_evals=3)
    acc = {m: r["row"]["test_accuracy"] for m, r in results.items()}
    ms = {m: r["row"]["median_step_ms"] for m, r in results.items()}
    rows = [
        {
            "result": "test accuracy, forward gradient",
            "seed": "0.9091",
            "ours": f"{acc['forward gradient']:.4f} after {steps} steps",
        },
        {
            "result": "test accuracy, backprop",
            "seed": "0.8839",
            "ours": f"{acc['backprop']:.4f} after {steps} steps",
        },
        {
            "result": "step time",
            "seed": "in our case we did not notice a speed-up",
            "ours": f"forward gradient {ms['forward gradient']:.1f} ms, backprop "
            f"{ms['backprop']:.1f} ms (medians)",
        },
    ]
    title = f"{dataset_name}, {model_name}, {steps} steps of {batch_size}"
    settings = {
        "dataset": dataset_name,
        "model": model_name,
        "batch_size": batch_size,
        "steps": steps,
        "optimizer": "SGD lr 5e-4 exp(-1e-4 t)",
    }
    return Report(rows, settings, results, lambda out: _training_plots(results, out, title))


# --- proxprop-mlp: the ProxProp paper's MLP setting, seed 000 ----------------------------------


def proxprop_mlp(quick: bool) -> Report:
    """Seed 000's MLP setting on MNIST instead of CIFAR-10: MLP 784-1000-1000-10, batch 500,
    Nesterov momentum 0.95; ProxProp hidden layers (exact solve and cg3, τ = 0.05, lr 1)
    against backprop lr 0.05; 3 epochs over the first 20,000 training images (``quick``:
    MLP 784-128-10, 2 epochs of 2 steps of 64 on the synthetic set)."""
    model_name, dataset_name = ("mlp-small", "synthetic") if quick else ("proxprop-mlp", "mnist")
    batch_size, num_train, epochs = (64, 128, 2) if quick else (500, 20000, 3)
    dataset = _subset(data_lib.load(dataset_name), num_train)
    steps_per_epoch = num_train // batch_size
    methods = [
        _method(
            "backprop lr 0.05",
            "backprop, Nesterov SGD lr 0.05 momentum 0.95",
            lambda: recipes.Setup(optax.sgd(0.05, momentum=0.95, nesterov=True)),
        ),
        *recipes.get(["proxprop-exact", "proxprop"]),
    ]
    config = recipes.RunConfig(steps=epochs * steps_per_epoch, batch_size=batch_size, seed=0)
    results = _train_methods(methods, dataset, model_name, config, num_evals=epochs)
    per_epoch = {}
    for name, r in results.items():
        loss = np.asarray(r["history"]["loss"]).reshape(epochs, steps_per_epoch)
        wall = np.asarray(r["history"]["wall"]).reshape(epochs, steps_per_epoch)
        per_epoch[name] = {
            "train_loss": loss.mean(axis=1).tolist(),
            "seconds": wall[:, -1].tolist(),
            "test_accuracy": list(r["history"]["test_accuracy"]),
        }

    def describe(name: str) -> str:
        e = per_epoch[name]
        return (
            f"{name}: loss per epoch {', '.join(f'{v:.3f}' for v in e['train_loss'])}; "
            f"at {', '.join(f'{v:.0f}' for v in e['seconds'])} s; "
            f"test acc {e['test_accuracy'][-1]:.4f}"
        )

    rows = [
        {
            "result": "training loss per epoch and per second (mean mini-batch loss of each epoch)",
            "seed": "ProxProp lowers the training loss faster per epoch, and stays competitive "
            "in wall-clock (REFERENCE.md, the paper's MLP on CIFAR-10)",
            "ours": describe(name),
        }
        for name in per_epoch
    ]
    title = f"{dataset_name}, {model_name}, {epochs} epochs of {steps_per_epoch} steps"
    settings = {
        "dataset": dataset_name,
        "train_images": num_train,
        "model": model_name,
        "batch_size": batch_size,
        "epochs": epochs,
        "methods": {m.name: m.description for m in methods},
    }
    data = {"per_epoch": per_epoch, "runs": results}
    return Report(rows, settings, data, lambda out: _training_plots(results, out, title))


# --- alig-robustness: the max_lr sweep, seed 002 -----------------------------------------------

SWEEP_LRS = (1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)
SWEEP_FACTORIES: dict[str, Callable[[float], optax.GradientTransformation]] = {
    "alig": lambda lr: alig(max_lr=lr, momentum=0.9),
    "sgd": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: optax.adam(lr),
}


def alig_robustness(quick: bool) -> Report:
    """Seed 002: AliG (max_lr, momentum 0.9, no schedule) against Nesterov SGD (lr, momentum
    0.9) and Adam (lr) for each rate in :data:`SWEEP_LRS`, one epoch of the MLP 784-128-10
    over the first 25,600 MNIST images, batch 128 (``quick``: two rates, 4 steps of 64 on
    the synthetic set)."""
    lrs = (1e-2, 1e2) if quick else SWEEP_LRS
    dataset_name = "synthetic" if quick else "mnist"
    batch_size, num_train = (64, 256) if quick else (128, 25600)
    dataset = _subset(data_lib.load(dataset_name), num_train)
    steps = 4 if quick else num_train // batch_size
    config = recipes.RunConfig(steps=steps, batch_size=batch_size, seed=0)
    methods = [
        _method(
            f"{name} lr {lr:g}", f"{name}, lr {lr:g}", lambda f=factory, v=lr: recipes.Setup(f(v))
        )
        for lr in lrs
        for name, factory in SWEEP_FACTORIES.items()
    ]
    results = _train_methods(methods, dataset, "mlp-small", config, num_evals=1)
    accuracy = {
        name: [results[f"{name} lr {lr:g}"]["row"]["test_accuracy"] for lr in lrs]
        for name in SWEEP_FACTORIES
    }

    def describe(name: str) -> str:
        learned = sum(a >= 0.5 for a in accuracy[name])
        return (
            f"{name}: test acc {', '.join(f'{a:.3f}' for a in accuracy[name])} at lr "
            f"{', '.join(f'{lr:g}' for lr in lrs)}; above 0.5 at {learned} of {len(lrs)} rates"
        )

    rows = [
        {
            "result": "test accuracy over the learning-rate grid",
            "seed": "AliG with a single constant max_lr matches SGD that needs a hand-tuned "
            "schedule (REFERENCE.md, the paper)",
            "ours": describe(name),
        }
        for name in SWEEP_FACTORIES
    ]

    def plot(output: Path) -> list[Path]:
        fig, ax = _pyplot().subplots(figsize=(6, 4))
        for name, acc in accuracy.items():
            ax.plot(lrs, acc, marker="o", label=name)
        ax.set(
            xscale="log",
            xlabel="max_lr (AliG) / learning rate (SGD, Adam)",
            ylabel="test accuracy",
            title=f"{dataset_name}, mlp-small, {steps} steps of {batch_size}",
        )
        ax.legend()
        return [_save(fig, output / "sweep.png")]

    settings = {
        "dataset": dataset_name,
        "train_images": num_train,
        "model": "mlp-small",
        "batch_size": batch_size,
        "steps": steps,
        "learning_rates": list(lrs),
    }
    return Report(rows, settings, {"test_accuracy": accuracy, "runs": results}, plot)


TARGETS: tuple[Target, ...] = (
    Target(
        "backpack-diag-ggn",
        "BackPACK's diag-GGN-MC preconditioned SGD, CNN on MNIST, 100 iterations, 5 seeds",
        "seed 001 (BackPACK README), its printed run",
        3.0,
        15,
        backpack_diag_ggn,
    ),
    Target(
        "autosize-xor",
        "ProxGradPytorch's XOR, 2-100-1, linf1 reg 0.005, 5000 epochs, 20 seeds",
        "seed 004 (ProxGradPytorch README)",
        2.0,
        10,
        autosize_xor,
    ),
    Target(
        "fwdgrad-mnist",
        "forward gradient against backprop, MLP 784-1024-1024-10 on MNIST, batch 1024",
        "seed 003 (fwdgrad README), its test-accuracy table",
        9.0,
        10,
        fwdgrad_mnist,
    ),
    Target(
        "proxprop-mlp",
        "ProxProp exact / cg3 (tau 0.05, Nesterov lr 1) against backprop lr 0.05, MNIST MLP",
        "REFERENCE.md's summary of seed 000's paper (the README quotes no number)",
        6.0,
        15,
        proxprop_mlp,
    ),
    Target(
        "alig-robustness",
        "AliG against SGD and Adam over learning rates 1e-3 .. 1e3, MNIST MLP, one epoch",
        "REFERENCE.md's summary of seed 002's paper (the README quotes no number)",
        4.0,
        25,
        alig_robustness,
    ),
)


def registry() -> dict[str, Target]:
    """All targets by name, in the order of :data:`TARGETS`."""
    return {t.name: t for t in TARGETS}


def listing() -> str:
    """One line per target: name, expected full and ``--quick`` run times, summary."""
    return "\n".join(
        f"  {t.name:<18} ~{t.minutes:g} min (--quick ~{t.quick_seconds:g} s)  {t.summary}"
        for t in TARGETS
    )


CLAIM_COLUMNS = [("result", "result", "{}"), ("seed", "seed's claim", "{}"), ("ours", "ours", "{}")]


def reproduce(name: str, quick: bool = False, output: str | Path | None = None) -> Report:
    """Runs one target, prints its claim table and writes ``results.json``, ``reproduce.md``
    and plots to ``output`` (default ``runs/reproduce/NAME``, ``NAME-quick`` with ``quick``).

    Raises:
      ValueError: ``name`` is not a target (the message lists them), or ``output`` is an
        existing file.
    """
    targets = registry()
    if name not in targets:
        raise ValueError(f"unknown target {name!r}; valid names: {', '.join(targets)}")
    target = targets[name]
    output = Path(output or f"runs/reproduce/{name}{'-quick' if quick else ''}")
    if output.exists() and not output.is_dir():
        raise ValueError(f"--output {output} is an existing file; give a directory")
    expected = f"~{target.quick_seconds:g} s" if quick else f"~{target.minutes:g} min"
    print(f"{name}{' --quick' if quick else ''}: {target.summary}")
    print(f"expected run time on 2 CPU cores: {expected}", flush=True)
    started = time.perf_counter()
    report = target.run(quick)
    seconds = time.perf_counter() - started
    output.mkdir(parents=True, exist_ok=True)
    command = f"jaxopt-suite reproduce {name}{' --quick' if quick else ''}"
    print(f"\n{command}  (claims from {target.source})\n")
    print(cli.format_table(report.rows, columns=CLAIM_COLUMNS))
    payload = {
        "target": name,
        "quick": quick,
        "command": command,
        "source": target.source,
        "settings": report.settings,
        "rows": report.rows,
        "seconds": seconds,
        "data": report.data,
    }
    benchmarking.write_json(output / "results.json", payload)
    md = [
        f"# reproduce {name}",
        "",
        f"Command: `{command}` ({seconds:.0f} s; claims from {target.source}).",
        "",
        cli.format_table(report.rows, markdown=True, columns=CLAIM_COLUMNS),
        "",
        "Settings: " + ", ".join(f"{k} {v}" for k, v in report.settings.items()),
        "",
    ]
    written = cli.write_plots(lambda: report.plot(output), md)
    (output / "reproduce.md").write_text("\n".join(md) + "\n")
    plots = " and plots" if written else ""
    print(f"\nwrote {output / 'results.json'}, {output / 'reproduce.md'}{plots} ({seconds:.0f} s)")
    return report
