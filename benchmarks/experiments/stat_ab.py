"""Session 5 (notes.md): same-run A/B of the engine's CNN ``diag_ggn_exact`` with the
per-sample conv statistic off (``old``: ``EngineConfig.per_sample_product`` raised) and on
(``new``); ``new0`` also sends ``Conv_0`` through it (``conv_few_weights=False`` and the
threshold at 0).

From the repository root, under the benchmark lock::

    flock /tmp/jaxopt_bench.lock .venv/bin/python benchmarks/experiments/stat_ab.py old,new

``R`` sets the repeats.
"""

import os
import sys

import jax
from cnn_problem import Lowered, args, compare_variants, engine_fn, loss, time_and_print

from jaxopt_suite import curvature

VARIANTS = {
    "old": curvature.EngineConfig(per_sample_product=1 << 62),
    "new": curvature.EngineConfig(),
    "new0": curvature.EngineConfig(conv_few_weights=False, per_sample_product=0),
}


variants = sys.argv[1].split(",") if len(sys.argv) > 1 else ["old", "new"]
fns = {"grad": (jax.jit(jax.grad(loss)), args[:3])}
outs = {}
for v in variants:
    fns[v] = (Lowered(engine_fn("diag_ggn_exact", VARIANTS[v]), args), args)
    outs[v] = fns[v][0].lowered.compile()(*args)[2]["diag_ggn_exact"]
compare_variants(variants, outs)
time_and_print(fns, int(os.environ.get("R", 11)))
