"""Session 5 (``benchmarks/results/curvature.md``): same-run A/B of the engine's quantities
on the BackPACK CNN (N = 64; ``MODEL=mlp``: the MLP, N = 128) with session 5's two changes
switched off and on, each variant lowered under its switches and timed interleaved against
the plain ``jax.value_and_grad``:

* ``old``: one VJP call per loss-Hessian column (``EngineConfig(column_groups=16)``) and the
  conv kernel gradient from the convolution's VJP (``kernel_grad_from_patches=False``);
* ``groups``: the columns in groups (one ``jax.vmap`` per group, one group per core), kernel
  gradient from the VJP; ``groups3``: three groups;
* ``kpatch``: one call per column, kernel gradient from the patches;
* ``new``: both (the engine's defaults).

From the repository root, under the benchmark lock::

    flock /tmp/jaxopt_bench.lock .venv/bin/python benchmarks/experiments/s5_ab.py \
        diag_ggn_exact old,new

The first argument is a comma-separated list of quantities (each timed in its own round of
variants), the second the variants; ``R`` sets the repeats.
"""

import os
import sys

import jax
from cnn_problem import Lowered, args, compare_variants, engine_fn, loss, time_and_print

from jaxopt_suite import curvature

VARIANTS = {
    "old": curvature.EngineConfig(column_groups=16, kernel_grad_from_patches=False),
    "groups": curvature.EngineConfig(kernel_grad_from_patches=False),
    "groups3": curvature.EngineConfig(column_groups=3, kernel_grad_from_patches=False),
    "kpatch": curvature.EngineConfig(column_groups=16),
    "new": curvature.EngineConfig(),
}


quantities = sys.argv[1].split(",") if len(sys.argv) > 1 else ["diag_ggn_exact"]
variants = sys.argv[2].split(",") if len(sys.argv) > 2 else ["old", "new"]
for q in quantities:
    fns = {"grad": (jax.jit(jax.value_and_grad(loss)), args[:3])}
    outs = {}
    for v in variants:
        fns[v] = (Lowered(engine_fn(q, VARIANTS[v]), args), args)
        outs[v] = fns[v][0].lowered.compile()(*args)
    compare_variants(variants, outs, q)
    time_and_print(fns, int(os.environ.get("R", 21)), q)
