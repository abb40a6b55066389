"""The methods ``compare`` knows, each a recipe for one training run: ONE explicit list.

A :class:`Method` builds a :class:`Setup` from the run's :class:`RunConfig`: the optax
transformation, the gradient function that feeds it (``train.backprop`` unless the method needs
more), layer substitutions for the zoo model (ProxProp), and extra metrics for the report.
:data:`METHODS` lists every method, baselines first; adding one is one entry there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxopt_suite import alig, autosize, fwdgrad, group_sparsity, kronecker, precondition
from jaxopt_suite.harness import benchmarking, train, zoo
from jaxopt_suite.proxprop import ProxPropConv, ProxPropDense


class RunConfig(NamedTuple):
    """What a method may need to know about the run it is built for."""

    steps: int
    batch_size: int
    seed: int


@dataclasses.dataclass(frozen=True)
class Setup:
    """One method's training recipe.

    Attributes:
      tx: the optax transformation.
      gradient: ``(problem, params, batch, key) -> (value, direction, tx.update kwargs)``.
      layers: layer classes substituted in the zoo model (``zoo.make_model(name, **layers)``).
      report: ``params -> {column: value}``, extra numbers for the results table.
    """

    tx: optax.GradientTransformation
    gradient: train.GradientFn = train.backprop
    layers: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    report: Callable[[Any], Mapping[str, Any]] | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    description: str
    build: Callable[[RunConfig], Setup]


def sgd_decay(learning_rate: float, decay: float = 1e-4) -> optax.Schedule:
    """The forward-gradient seed's schedule ``learning_rate * exp(-decay * step)``."""
    return optax.exponential_decay(learning_rate, transition_steps=1, decay_rate=math.exp(-decay))


# ProxProp: ProxProp hidden layers (Dense and Conv), a plain output layer, and the paper's two
# optimizer settings: the MLP one, tau 0.05 with Nesterov SGD lr 1 momentum 0.95 (backprop's
# counterpart is lr 0.05), cg3 or the exact solve; the ConvNet one, tau 1, cg3, Adam lr 1e-3.
# ``warmup``: the learning rate rises linearly from backprop's 0.05 to 1 over the first third
# of the run.
# Without it, at batch 128 the momentum built up in the first steps drove the MNIST MLP's loss
# from 2.4 up to 40-150 within 20 steps before it recovered; the paper ran batch 500.
def _proxprop(config: RunConfig, mode: str, tau: float, adam: bool, warmup: bool = False) -> Setup:
    layers = {
        "dense": functools.partial(ProxPropDense, tau_prox=tau, optimization_mode=mode),
        "conv": functools.partial(ProxPropConv, tau_prox=tau, optimization_mode=mode),
    }
    learning_rate = optax.linear_schedule(0.05, 1.0, max(1, config.steps // 3)) if warmup else 1.0
    tx = optax.adam(1e-3) if adam else optax.sgd(learning_rate, momentum=0.95, nesterov=True)
    return Setup(tx=tx, layers=layers)


# Group sparsity: SGD followed by the grouped prox on the hidden layers, reporting live units
# per layer. The strengths are demonstration values that prune visibly within a few hundred
# steps of the MNIST MLP (see ``benchmarks/results/proximal.md``).
def _live_report(params: Any) -> dict[str, str]:
    live, total = autosize.live_units(params), autosize.total_units(params)
    return {"live_units": ", ".join(f"{name} {live[name]}/{total[name]}" for name in live)}


def _live_and_shrunk_report(params: Any) -> dict[str, str]:
    """:func:`_live_report`, and for a zoo MLP with a live unit in every layer the shrunk
    model's size and speed-up."""
    report = _live_report(params)
    live = autosize.live_units(params)
    chain = [f"Dense_{i}" for i in range(len(params))]
    if sorted(params) == sorted(chain) and all(live[name] for name in chain):
        report.update(_shrunk_mlp(params, chain))
    return report


def _shrunk_mlp(params: Any, chain: list[str]) -> dict[str, str]:
    """For a zoo MLP: the parameter count after ``autosize.shrink`` and the inference speed-up
    of the shrunk model on 1000 inputs (interleaved medians, ``benchmarking.time_interleaved``)."""
    small, _ = autosize.shrink(params, chain)

    def forward(tree: Any) -> Callable:
        hidden = [tree[name]["bias"].shape[0] for name in chain[:-1]]
        model = zoo.MLP(hidden=hidden, num_classes=tree[chain[-1]]["bias"].shape[0])
        return jax.jit(lambda p, x: model.apply({"params": p}, x))

    x = jnp.zeros((1000, params[chain[0]]["kernel"].shape[0]), jnp.float32)
    timing = benchmarking.time_interleaved(
        {"full": (forward(params), (params, x)), "shrunk": (forward(small), (small, x))},
        baseline="shrunk",
        repeats=5,
        number=3,
    )
    count = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree))
    return {
        "shrunk_params": f"{count(params):,} -> {count(small):,}",
        "shrunk_speedup": f"{timing['full'].ratio:.1f}x",
    }


def _hidden_layers(params: Any) -> dict[str, bool]:
    """Mask for a zoo model: every top-level layer but the output one (the last ``Dense_i``),
    whose units are the classes."""
    dense = sorted((int(k.split("_")[1]), k) for k in params if k.startswith("Dense_"))
    return {k: not dense or k != dense[-1][1] for k in params}


def _last_hidden_layer(params: Any) -> dict[str, bool]:
    """Mask for a zoo model: only the Dense layer before the output one."""
    dense = sorted((int(k.split("_")[1]), k) for k in params if k.startswith("Dense_"))
    return {k: len(dense) > 1 and k == dense[-2][1] for k in params}


def _group_sparsity(config: RunConfig, norm: str, reg: float) -> Setup:
    del config
    return Setup(
        tx=optax.chain(optax.sgd(0.1), group_sparsity(reg, 0.1, norm=norm, mask=_hidden_layers)),
        report=_live_report,
    )


# The demo's pruning run: the prox acts on the last hidden layer during the first third of the
# steps only, then SGD alone lets the surviving units recover from the shrinkage. A deleted
# unit stays deleted: its pre-activation is exactly 0 and ReLU's derivative at 0 is 0, so no
# gradient reaches its weights. On every hidden layer at once the same strength cascades (the
# second layer loses its inputs) and the whole network dies within a narrow range of reg.
def _prune_then_recover(config: RunConfig, reg: float) -> Setup:
    window = max(1, config.steps // 3)
    prox_lr = lambda step: jnp.where(step < window, 0.1, 0.0)
    prox = group_sparsity(reg, prox_lr, norm="l21", mask=_last_hidden_layer)
    return Setup(tx=optax.chain(optax.sgd(0.1), prox), report=_live_and_shrunk_report)


# Forward gradient: the learning rate 1e-4 suits the MLP 784-1024-1024-10 (a forward
# gradient's variance grows with the number of parameters, so its stable step shrinks with it):
# on MNIST 3e-4 diverged, the seed used 2e-4, 3e-5 learns three times slower.
def _fwdgrad(config: RunConfig, distribution: str, structure: str, learning_rate: float) -> Setup:
    tx = optax.chain(
        fwdgrad.forward_gradient(
            jax.random.key(config.seed + 1), distribution=distribution, structure=structure
        ),
        optax.sgd(sgd_decay(learning_rate)),
    )
    return Setup(tx, gradient=train.value_fn_gradient)


_NESTEROV = "Nesterov SGD lr 1 momentum 0.95"

METHODS: tuple[Method, ...] = (
    Method("sgd", "backprop, SGD lr 0.1", lambda cfg: Setup(optax.sgd(0.1))),
    Method(
        "sgd-momentum",
        "backprop, SGD lr 0.05 momentum 0.9",
        lambda cfg: Setup(optax.sgd(0.05, momentum=0.9)),
    ),
    Method("adam", "backprop, Adam lr 1e-3", lambda cfg: Setup(optax.adam(1e-3))),
    # AliG: one constant max_lr, no schedule
    Method(
        "alig",
        "backprop, AliG max_lr 0.1 momentum 0.9 (step from the loss, no schedule)",
        lambda cfg: Setup(alig(max_lr=0.1, momentum=0.9)),
    ),
    Method(
        "proxprop",
        f"ProxProp hidden layers, cg3, tau 0.05, {_NESTEROV} (paper's MLP setting)",
        functools.partial(_proxprop, mode="prox_cg3", tau=0.05, adam=False),
    ),
    Method(
        "proxprop-warmup",
        f"ProxProp hidden layers, cg3, tau 0.05, {_NESTEROV}, the lr warmed up linearly from "
        "0.05 over the first third of the steps",
        functools.partial(_proxprop, mode="prox_cg3", tau=0.05, adam=False, warmup=True),
    ),
    Method(
        "proxprop-exact",
        f"ProxProp hidden layers, exact solve, tau 0.05, {_NESTEROV}",
        functools.partial(_proxprop, mode="prox_exact", tau=0.05, adam=False),
    ),
    Method(
        "proxprop-adam",
        "ProxProp hidden layers, cg3, tau 1, Adam lr 1e-3 (paper's ConvNet setting)",
        functools.partial(_proxprop, mode="prox_cg3", tau=1.0, adam=True),
    ),
    # BackPACK's example optimizer
    Method(
        "diag-ggn-mc",
        "SGD lr 0.01 / (diag GGN-MC + 1) (BackPACK example)",
        lambda cfg: Setup(
            tx=precondition.diag_ggn_sgd(0.01, damping=1.0),
            gradient=train.curvature_gradient("diag_ggn_mc"),
        ),
    ),
    Method(
        "sgd+linf1",
        "SGD lr 0.1, then linf1 group prox per hidden neuron (reg 0.5, lr 0.1)",
        functools.partial(_group_sparsity, norm="linf1", reg=0.5),
    ),
    Method(
        "sgd+l21",
        "SGD lr 0.1, then l21 group prox per hidden neuron (reg 0.05, lr 0.1)",
        functools.partial(_group_sparsity, norm="l21", reg=0.05),
    ),
    Method(
        "sgd+l21-prune",
        "SGD lr 0.1, then l21 group prox (reg 0.1, lr 0.1) per neuron of the last hidden layer "
        "during the first third of the steps; the deleted units stay deleted",
        functools.partial(_prune_then_recover, reg=0.1),
    ),
    # the fast estimator and the paper's directions
    Method(
        "fwdgrad",
        "forward gradient (rank-one Rademacher directions), SGD lr 1e-4 exp(-1e-4 t)",
        functools.partial(
            _fwdgrad, distribution="rademacher", structure="rank_one", learning_rate=1e-4
        ),
    ),
    Method(
        "fwdgrad-normal",
        "forward gradient (dense normal directions), SGD lr 1e-4 exp(-1e-4 t)",
        functools.partial(_fwdgrad, distribution="normal", structure="dense", learning_rate=1e-4),
    ),
    # tangents on the layers' pre-activations: variance grows with the activations, not the
    # weights, so it learns in the demo's budget (lr 1e-2 diverged with K = 1 and 4)
    Method(
        "fwdgrad-activity",
        "activity-perturbed forward gradient (4 Rademacher tangents per sample), SGD lr 5e-3",
        lambda cfg: Setup(optax.sgd(5e-3), gradient=train.activity_gradient(4, "rademacher")),
    ),
    # KFAC (one MC column per sample) from the curvature engine
    Method(
        "kfac",
        "SGD lr 0.03 on KFAC-preconditioned gradients (engine kfac, damping 1e-2, "
        "inverses every 10 steps)",
        lambda cfg: Setup(
            tx=kronecker.kfac_sgd(0.03, damping=1e-2, decay=0.95, inverse_every=10),
            gradient=train.curvature_gradient("kfac"),
        ),
    ),
)


def registry() -> dict[str, Method]:
    """All methods by name, in the order of :data:`METHODS` (baselines first)."""
    return {m.name: m for m in METHODS}


def get(names: list[str]) -> list[Method]:
    """Looks methods up by name; an unknown name raises a ValueError listing the valid ones."""
    known = registry()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid names: {', '.join(known)}")
    return [known[n] for n in names]
