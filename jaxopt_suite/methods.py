"""The methods ``compare`` knows, each a recipe for one training run.

A :class:`Method` builds a :class:`Setup` from the run's :class:`RunConfig`: the optax
transformation, the gradient function that feeds it (``train.backprop`` unless the method needs
more), layer substitutions for the zoo model (ProxProp), and extra metrics for the report.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import optax

from jaxopt_suite import train


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


def _baselines() -> list[Method]:
    return [
        Method("sgd", "backprop, SGD lr 0.1", lambda cfg: Setup(optax.sgd(0.1))),
        Method(
            "sgd-momentum",
            "backprop, SGD lr 0.05 momentum 0.9",
            lambda cfg: Setup(optax.sgd(0.05, momentum=0.9)),
        ),
        Method("adam", "backprop, Adam lr 1e-3", lambda cfg: Setup(optax.adam(1e-3))),
    ]


# Modules that contribute methods through a ``compare_methods() -> list[Method]`` function.
_PROVIDERS: tuple[str, ...] = (
    # one line per module, e.g. "jaxopt_suite.alig",
    "jaxopt_suite.alig",
    "jaxopt_suite.proxprop",
    "jaxopt_suite.precondition",
    "jaxopt_suite.proximal",
    "jaxopt_suite.fwdgrad",
    "jaxopt_suite.kronecker",
)


def registry() -> dict[str, Method]:
    """All methods by name, baselines first."""
    methods = _baselines()
    for module_name in _PROVIDERS:
        methods += importlib.import_module(module_name).compare_methods()
    return {m.name: m for m in methods}


def get(names: list[str]) -> list[Method]:
    """Looks methods up by name; an unknown name raises a ValueError listing the valid ones."""
    known = registry()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; valid names: {', '.join(known)}")
    return [known[n] for n in names]
