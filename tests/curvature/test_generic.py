"""The generic path's ``chunk_size`` bounds its memory (compiled temporaries, no run)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxopt_suite import curvature


def test_chunk_size_bounds_the_generic_paths_memory():
    # a hand-written model: no layer rule, every parameter on the generic path
    n, d = 64, 48

    def apply_fn(p, x):
        return jnp.tanh(x @ p["w"]) @ p["v"]

    params = {"w": jnp.ones((d, d)), "v": jnp.ones((d, 3))}
    x, y = jnp.ones((n, d)), jnp.zeros((n,), jnp.int32)

    def temp_bytes(chunk_size):
        fn = curvature.value_and_grad(
            apply_fn,
            loss="cross_entropy",
            quantities=("sum_grad_squared", "diag_ggn_exact"),
            chunk_size=chunk_size,
        )
        compiled = jax.jit(fn).lower(params, x, y).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(None), temp_bytes(4)
    per_sample_gradients = n * d * d * 4  # what an unchunked per-sample path holds at least
    assert whole >= per_sample_gradients
    assert chunked < per_sample_gradients / 4, (whole, chunked)
