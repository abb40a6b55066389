"""Same-run A/B of the engine with and without the banded conv input cotangent (notes.md).

Run from the repository root under the benchmark lock:
``flock /tmp/jaxopt_bench.lock .venv/bin/python benchmarks/experiments/band_ab.py``
(``R=11`` sets the repeats). The "noband" variants (``EngineConfig(banded_conv_cotangent=False)``)
keep the mask backward of max-pooling.
"""

import os

import jax
from cnn_problem import Lowered, args, engine_fn, loss, time_and_print

from jaxopt_suite import curvature

fns = {"grad": (jax.jit(jax.grad(loss)), args[:3])}
noband = curvature.EngineConfig(banded_conv_cotangent=False)
for q in ("diag_ggn_exact", "diag_ggn_mc"):
    fns[q + "_band"] = (Lowered(engine_fn(q, curvature.EngineConfig()), args), args)
    fns[q + "_noband"] = (Lowered(engine_fn(q, noband), args), args)
time_and_print(fns, int(os.environ.get("R", 11)))
