"""Timing and memory measurement shared by ``compare`` and ``benchmarks/``.

Machines are shared and noisy, so a claim is a *ratio* measured side by side: the functions
are compiled first, then called in interleaved rounds (A, B, C, A, B, C, ...), and each one's
median over the rounds is divided by the baseline's median. Memory comes from XLA's
``compiled.memory_analysis()`` (deterministic, works on CPU) and, on GPU, from the device's
peak-bytes counter.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np


def compiled_memory(compiled: Any) -> dict[str, int]:
    """Bytes that a compiled XLA executable needs, from ``memory_analysis()``.

    ``total`` = arguments + outputs + temporaries - aliased (donated) bytes: the footprint of
    one call. ``temp`` alone is the scratch memory the computation adds on top of its inputs.
    """
    analysis = compiled.memory_analysis()
    if analysis is None:  # some backends don't report
        return {"argument": -1, "output": -1, "temp": -1, "alias": -1, "total": -1}
    if isinstance(analysis, list | tuple):
        analysis = analysis[0]
    arg = int(analysis.argument_size_in_bytes)
    out = int(analysis.output_size_in_bytes)
    temp = int(analysis.temp_size_in_bytes)
    alias = int(analysis.alias_size_in_bytes)
    return {
        "argument": arg,
        "output": out,
        "temp": temp,
        "alias": alias,
        "total": arg + out + temp - alias,
    }


def device_peak_memory() -> int | None:
    """Peak bytes in use on the first device (GPU/TPU), or None where it is not reported."""
    stats = jax.devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", -1))


class Timing(NamedTuple):
    """Per-function results of :func:`time_interleaved` (seconds per call)."""

    median: float
    samples: np.ndarray
    ratio: float  # median / baseline median
    memory: dict[str, int]


def _block(x: Any) -> Any:
    return jax.tree.map(
        lambda a: a.block_until_ready() if hasattr(a, "block_until_ready") else a, x
    )


def time_interleaved(
    fns: Mapping[str, tuple[Callable, Sequence[Any]]],
    *,
    baseline: str,
    repeats: int = 15,
    number: int = 3,
    warmup: int = 2,
) -> dict[str, Timing]:
    """Times jitted functions side by side, interleaved, after compilation.

    Args:
      fns: name -> (jitted function, positional args). Each is lowered and compiled once;
        the compiled executable is what gets timed (arguments are not donated).
      baseline: the name whose median is the denominator of every ``ratio``.
      repeats: rounds; each round calls every function ``number`` times in turn, starting
        one function later than the round before (the first function of a round tends to
        find colder caches, so no function is always first).
      number: calls per function per round; a sample is their mean.
      warmup: untimed rounds first.

    Returns:
      name -> :class:`Timing` (median seconds per call, samples, ratio, compiled memory).
    """
    if baseline not in fns:
        raise ValueError(f"baseline {baseline!r} is not one of the timed functions {list(fns)}")
    compiled = {}
    memory = {}
    for name, (fn, args) in fns.items():
        exe = fn.lower(*args).compile()
        compiled[name] = (exe, args)
        memory[name] = compiled_memory(exe)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(compiled)
    for r in range(warmup + repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            exe, args = compiled[name]
            start = time.perf_counter()
            for _ in range(number):
                out = exe(*args)
            _block(out)
            # Free the outputs inside this function's own timing: a large output (e.g. N x P
            # per-sample gradients) would otherwise be released during the next function's.
            del out
            if r >= warmup:
                samples[name].append((time.perf_counter() - start) / number)
    base = float(np.median(samples[baseline]))
    return {
        name: Timing(
            median=float(np.median(s)),
            samples=np.asarray(s),
            ratio=float(np.median(s)) / base,
            memory=memory[name],
        )
        for name, s in samples.items()
    }


def environment() -> dict[str, Any]:
    """Machine and library versions, recorded next to every result."""
    import flax
    import optax

    return {
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": __import__("os").cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "flax": flax.__version__,
        "platform": platform.platform(),
    }


def write_json(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Writes ``payload`` plus the environment as indented JSON, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"environment": environment(), **payload}
    path.write_text(json.dumps(body, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray | jax.Array):
        return np.asarray(x).tolist()
    if isinstance(x, np.generic):
        return x.item()
    if hasattr(x, "_asdict"):
        return x._asdict()
    raise TypeError(f"not JSON serialisable: {type(x)}")
