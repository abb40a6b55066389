"""The curvature engine's LayerNorm and Embed rules against brute force.

Three tiny models: Embed -> Dense -> tanh -> LayerNorm -> Dense over a sequence axis in flax
linen (cross-entropy at every position, repeated and unused tokens) and in nnx (token array
with two extra axes, MSE, LayerNorm without the fast variance), and a LayerNorm on a conv
feature map. Every quantity of the first-order, GGN and Hessian families is compared with
per-sample ``jax.grad`` / ``jax.jacrev`` / ``jax.hessian`` loops on the raveled parameters
(tests/reference.py; Monte Carlo ones with many samples against the exact GGN, loosely) and,
all but ``diag_h`` (whose generic path costs the most to compile), with the generic path
(``structured=False``, same key: identical draws, so exact). ``kflr`` / ``kfac`` of the new
leaves are checked against the exact GGN blocks. ``coverage`` must name the new kinds and
fall back where the rules don't apply, and the Embed rule must not form an (N, V, D) buffer
for the quantities that don't return one.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxopt_suite import benchmarking, curvature
from jaxopt_suite.curvature.rules import embed as embed_rule
from jaxopt_suite.curvature.rules import layernorm as layernorm_rule
from tests import reference
from tests.reference import random_like

TOL = dict(atol=1e-5, rtol=1e-5)
MC_SAMPLES = 3000
MC_TOL = 0.1  # relative to the largest entry of the exact value
FAST_COMPILE = {"xla_backend_optimization_level": 0}
FIRST_ORDER = ("grad_batch", "batch_l2", "sum_grad_squared", "variance")
EXACT = ("diag_ggn_exact", "diag_ggn_exact_batch", "sqrt_ggn_exact", "diag_h", "diag_h_batch")
MC = ("diag_ggn_mc", "diag_ggn_mc_batch", "sqrt_ggn_mc")
KRON = ("kflr", "kfac")


class SeqNet(nn.Module):
    vocab: int = 6
    dim: int = 4

    @nn.compact
    def __call__(self, tokens):
        h = jnp.tanh(nn.Dense(self.dim)(nn.Embed(self.vocab, self.dim)(tokens)))
        return nn.Dense(3)(nn.LayerNorm()(h))


class NnxSeqNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(5, 3, rngs=rngs)
        self.mid = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.LayerNorm(4, use_fast_variance=False, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, tokens):
        return self.head(self.norm(jnp.tanh(self.mid(self.embed(tokens)))))


class ConvNormNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.swish(nn.LayerNorm()(nn.Conv(3, (3, 3), padding="SAME")(x)))
        return nn.Dense(3)(jnp.mean(h, axis=(1, 2)))


@functools.cache
def case(name):
    """(apply_fn, params, inputs, targets, loss, kinds): ``kinds`` maps the new leaves'
    paths to the kind ``coverage`` must report."""
    if name == "nnx":
        graphdef, state = nnx.split(nnx.eval_shape(lambda: NnxSeqNet(nnx.Rngs(0))))
        tokens = jnp.array([[[0, 4, 0], [4, 4, 1]], [[2, 2, 2], [3, 0, 1]]])
        targets = jax.random.normal(jax.random.key(1), (2, 2, 3, 2))
        kinds = {"embed": "embed", "norm": "layernorm"}
        apply_fn = lambda s, x: nnx.merge(graphdef, s)(x)
        params = random_like(state, std=0.7, dtype=jnp.float32)
        return apply_fn, params, tokens, targets, "mse", kinds
    if name == "linen":
        model, x = SeqNet(), jnp.array([[1, 3, 1, 1], [0, 2, 4, 2]])  # token 5 unused
        y, kinds = jnp.array([[0, 2, 1, 1], [2, 0, 0, 1]]), {"Embed_0": "embed"}
    else:
        model, x = ConvNormNet(), jax.random.normal(jax.random.key(1), (2, 4, 4, 2))
        y, kinds = jnp.array([2, 0]), {}
    kinds["LayerNorm_0"] = "layernorm"
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    params = random_like(shapes, std=0.7, dtype=jnp.float32)
    return lambda p, x: model.apply({"params": p}, x), params, x, y, "cross_entropy", kinds


@functools.cache
def brute_force(name):
    """Every exact quantity of ``case(name)`` by brute force (tests/reference.py), with the
    per-sample GGN blocks J^T H J and Hessian diagonals."""
    apply_fn, params, x, y, loss, _ = case(name)
    return reference.quantities(apply_fn, params, x, y, loss, full_ggn=True, hessian=True)


def _close(got, want, what):
    np.testing.assert_allclose(got, want, err_msg=what, **TOL)


def _close_mc(got, want, what):
    scale = np.abs(want).max() + 1e-12
    np.testing.assert_allclose(got / scale, want / scale, atol=MC_TOL, err_msg=what)


# a Monte Carlo quantity estimates the exact one
EXACT_OF = {"diag_ggn_mc": "diag_ggn_exact", "diag_ggn_mc_batch": "diag_ggn_exact_batch"}


def _lead(quantity):
    """Leading axes of a quantity's leaves before the parameter's own: 1 for per-sample ones."""
    return 1 if quantity in ("grad_batch", "batch_l2") or quantity.endswith("_batch") else 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ("linen", "nnx", "conv"))
def test_every_quantity_against_brute_force_and_generic(name):
    apply_fn, params, x, y, loss, _ = case(name)
    names = FIRST_ORDER + EXACT + MC
    kwargs = dict(loss=loss, mc_samples=MC_SAMPLES)
    structured = curvature.value_and_grad(apply_fn, quantities=names + KRON, **kwargs)
    # diag_h's generic path is the costliest compilation here, and brute force checks it
    compared = tuple(q for q in names if not q.startswith("diag_h"))
    generic = curvature.value_and_grad(apply_fn, quantities=compared, structured=False, **kwargs)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def both(params, x, y, key):
        return structured(params, x, y, key=key)[2], generic(params, x, y, key=key)[2]

    got, got_generic = both(params, x, y, jax.random.key(3))
    ref = brute_force(name)
    for q in compared:
        # same key, same Monte Carlo draws: the structured and generic paths agree exactly
        for a, b in zip(jax.tree.leaves(got[q]), jax.tree.leaves(got_generic[q]), strict=True):
            _close(np.asarray(a), np.asarray(b), f"{q}: structured vs generic")
    for q in names:
        if q.startswith("sqrt_ggn"):
            v = reference.flat(got[q], lead=2)  # (K, N, P): V Vᵀ is the per-sample GGN
            gram = reference.square_root_gram(v)
            (_close_mc if q in MC else _close)(gram, ref["ggn_batch"], q)
        else:
            check = _close_mc if q in MC else _close
            want = reference.flat(ref[EXACT_OF.get(q, q)], lead=_lead(q))
            check(reference.flat(got[q], lead=_lead(q)), want, q)
    # kflr / kfac: LayerNorm's 1-D leaves get their exact GGN block, the embedding table None
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    blocks = jax.tree.leaves(ref["ggn_blocks"])
    for q, check in (("kflr", _close), ("kfac", _close_mc)):
        factors_per_leaf = jax.tree.leaves(got[q], is_leaf=_is_factors)
        for path, factors, block in zip(paths, factors_per_leaf, blocks, strict=True):
            if "embed" in path.lower():
                assert factors is None, (q, path)
            elif "norm" in path.lower():
                check(np.asarray(factors[0], np.float64), block, f"{q} {path}")


def _is_factors(v):
    return v is None or isinstance(v, tuple)


class TiedEmbed(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(5, 3)
        return embed.attend(nn.LayerNorm(use_scale=False)(embed(tokens)))


class WideNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.LayerNorm(reduction_axes=(1, 2, 3))(nn.Conv(2, (1, 1))(x))


def test_coverage_names_the_new_kinds_and_falls_back_outside_them():
    for name in ("linen", "nnx", "conv"):
        apply_fn, params, x, _, _, kinds = case(name)
        found = curvature.coverage(apply_fn, params, x)
        for layer, kind in kinds.items():
            assert set(jax.tree.leaves(found[layer])) == {kind}, (name, layer, found[layer])
        assert "generic" not in jax.tree.leaves(found), (name, found)
    # an embedding table also read by attend (weight tying) is not the Embed rule's
    tokens = jnp.zeros((2, 3), jnp.int32)
    params = jax.eval_shape(TiedEmbed().init, jax.random.key(0), tokens)["params"]
    found = curvature.coverage(lambda p, t: TiedEmbed().apply({"params": p}, t), params, tokens)
    assert found == {"Embed_0": {"embedding": "generic"}, "LayerNorm_0": {"bias": "layernorm"}}
    # LayerNorm over other axes than the last is left to the generic path
    x = jnp.zeros((2, 3, 3, 2))
    params = jax.eval_shape(WideNorm().init, jax.random.key(0), x)["params"]
    found = curvature.coverage(lambda p, x: WideNorm().apply({"params": p}, x), params, x)
    assert set(jax.tree.leaves(found["LayerNorm_0"])) == {"generic"}, found


class BigVocab(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        return nn.Dense(3)(nn.Embed(4096, 8)(tokens))


def test_embed_rule_forms_no_per_sample_table():
    """(N, V, D) float32 per-sample gradients would be 1 MiB; the table itself is 128 KiB."""
    n, t = 8, 6
    tokens = jax.random.randint(jax.random.key(0), (n, t), 0, 4096)
    labels = jax.random.randint(jax.random.key(1), (n, t), 0, 3)
    params = jax.eval_shape(BigVocab().init, jax.random.key(0), tokens)["params"]
    per_sample_table = n * 4096 * 8 * 4
    for structured in (True, False):
        fn = curvature.value_and_grad(
            lambda p, x: BigVocab().apply({"params": p}, x),
            loss="cross_entropy",
            quantities=("batch_l2", "sum_grad_squared", "diag_ggn_mc"),
            structured=structured,
        )
        exe = jax.jit(fn).lower(params, tokens, labels, key=jax.random.key(2)).compile()
        temp = benchmarking.compiled_memory(exe)["temp"]
        if temp < 0:
            pytest.skip("this backend reports no memory analysis")
        # the generic path's buffers show that the bound detects them
        assert (temp < per_sample_table / 2) == structured, (structured, temp)


def test_embed_rule_rejects_non_integer_indices():
    with pytest.raises(TypeError, match="tokens must be integer"):
        embed_rule.embed("sum_sq", jnp.zeros((2, 3)), jnp.zeros((1, 2, 3, 4)), vocab=5)
    with pytest.raises(ValueError, match="unknown statistic"):
        layernorm_rule.layernorm("diag", "kernel", jnp.zeros((2, 4)), jnp.zeros((1, 2, 4)))
