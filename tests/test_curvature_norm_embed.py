"""The curvature engine's LayerNorm and Embed rules against brute force.

Three tiny models: Embed -> Dense -> tanh -> LayerNorm -> Dense over a sequence axis in flax
linen (cross-entropy at every position, repeated and unused tokens) and in nnx (token array
with two extra axes, MSE, LayerNorm without the fast variance), and a LayerNorm on a conv
feature map. Every quantity of the first-order, GGN and Hessian families is compared with
per-sample ``jax.grad`` / ``jax.jacrev`` / ``jax.hessian`` loops on the raveled parameters
(Monte Carlo ones with many samples against the exact GGN, loosely) and, all but ``diag_h``
(whose generic path costs the most to compile), with the generic path (``structured=False``,
same key: identical draws, so exact). ``kflr`` / ``kfac`` of the new
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
from jax.flatten_util import ravel_pytree

from jaxopt_suite import benchmarking, curvature
from jaxopt_suite.curvature import rules_norm

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


def _random_like(tree, seed=0):
    """numpy draws shaped like ``tree`` (flax's initialisers would cost compilations)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.7, a.shape), jnp.float32), tree)


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
        return apply_fn, _random_like(state), tokens, targets, "mse", kinds
    if name == "linen":
        model, x = SeqNet(), jnp.array([[1, 3, 1, 1], [0, 2, 4, 2]])  # token 5 unused
        y, kinds = jnp.array([[0, 2, 1, 1], [2, 0, 0, 1]]), {"Embed_0": "embed"}
    else:
        model, x = ConvNormNet(), jax.random.normal(jax.random.key(1), (2, 4, 4, 2))
        y, kinds = jnp.array([2, 0]), {}
    kinds["LayerNorm_0"] = "layernorm"
    params = _random_like(jax.eval_shape(model.init, jax.random.key(0), x)["params"])
    return lambda p, x: model.apply({"params": p}, x), params, x, y, "cross_entropy", kinds


def _loss_one(loss, out, y):
    """One sample's loss summed over positions, written independently of the engine."""
    if loss == "cross_entropy":
        logz = jax.scipy.special.logsumexp(out, axis=-1)
        return jnp.sum(logz - jnp.take_along_axis(out, y[..., None], axis=-1)[..., 0])
    return jnp.sum((out - y) ** 2)


@functools.cache
def brute_force(name):
    """Per-sample gradients (N, P), GGN blocks J^T H J and Hessians (N, P, P)."""
    apply_fn, params, x, y, loss, _ = case(name)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(params, x, y):
        flat, unravel = ravel_pytree(params)
        out_shape = apply_fn(params, x).shape
        terms = np.prod(out_shape[:-1]) if loss == "cross_entropy" else np.prod(out_shape)
        f_one = lambda v, xn: apply_fn(unravel(v), xn[None])[0]

        def sample(xy):
            xn, yn = xy
            ell = lambda v: _loss_one(loss, f_one(v, xn), yn) / terms
            out = f_one(flat, xn)
            jac = jax.jacrev(f_one)(flat, xn).reshape(out.size, flat.size)
            h_out = jax.hessian(lambda o: _loss_one(loss, o.reshape(out.shape), yn) / terms)(
                out.reshape(-1)
            )
            return jax.grad(ell)(flat), jac.T @ h_out @ jac, jax.hessian(ell)(flat)

        return jax.lax.map(sample, (x, y))

    grads, ggn, hess = (np.asarray(a, np.float64) for a in run(params, x, y))
    return {"grads": grads, "ggn": ggn, "hessian": hess}


def _flat(tree, lead=0):
    """Ravel a params-shaped tree whose leaves carry ``lead`` leading axes: (*lead, P)."""
    leaves = jax.tree.leaves(tree)
    shape = leaves[0].shape[:lead]
    return np.concatenate([np.asarray(a, np.float64).reshape(*shape, -1) for a in leaves], axis=-1)


def _slices(params):
    sizes = [int(np.prod(a.shape)) for a in jax.tree.leaves(params)]
    return [slice(e - s, e) for s, e in zip(sizes, np.cumsum(sizes), strict=True)]


def _close(got, want, what):
    np.testing.assert_allclose(got, want, err_msg=what, **TOL)


def _close_mc(got, want, what):
    scale = np.abs(want).max() + 1e-12
    np.testing.assert_allclose(got / scale, want / scale, atol=MC_TOL, err_msg=what)


def _expected(quantity, ref, params):
    """The brute-force value of a quantity, raveled like :func:`_flat` (batch_l2: per leaf)."""
    g = ref["grads"]
    n = g.shape[0]
    ggn_diag = np.diagonal(ref["ggn"], axis1=1, axis2=2)
    h_diag = np.diagonal(ref["hessian"], axis1=1, axis2=2)
    return {
        "grad_batch": g,
        "batch_l2": np.stack([(g[:, w] ** 2).sum(1) for w in _slices(params)], axis=1),
        "sum_grad_squared": (g**2).sum(0),
        "variance": (g**2).sum(0) / n - (g.sum(0) / n) ** 2,
        "diag_ggn_exact": ggn_diag.sum(0),
        "diag_ggn_exact_batch": ggn_diag,
        "diag_ggn_mc": ggn_diag.sum(0),
        "diag_ggn_mc_batch": ggn_diag,
        "diag_h": h_diag.sum(0),
        "diag_h_batch": h_diag,
    }[quantity]


def _raveled(quantity, value):
    if quantity == "batch_l2":
        return np.stack([np.asarray(a, np.float64) for a in jax.tree.leaves(value)], axis=1)
    return _flat(value, lead=1 if quantity in ("grad_batch",) or quantity.endswith("_batch") else 0)


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

    got, reference = both(params, x, y, jax.random.key(3))
    ref = brute_force(name)
    for q in compared:
        # same key, same Monte Carlo draws: the structured and generic paths agree exactly
        for a, b in zip(jax.tree.leaves(got[q]), jax.tree.leaves(reference[q]), strict=True):
            _close(np.asarray(a), np.asarray(b), f"{q}: structured vs generic")
    for q in names:
        if q.startswith("sqrt_ggn"):
            v = _flat(got[q], lead=2)  # (K, N, P): V Vᵀ is the per-sample GGN
            (_close_mc if q in MC else _close)(np.einsum("knp,knq->npq", v, v), ref["ggn"], q)
        else:
            check = _close_mc if q in MC else _close
            check(_raveled(q, got[q]), _expected(q, ref, params), q)
    # kflr / kfac: LayerNorm's 1-D leaves get their exact GGN block, the embedding table None
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    blocks = [ref["ggn"].sum(0)[w, w] for w in _slices(params)]
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
        rules_norm.embed("sum_sq", jnp.zeros((2, 3)), jnp.zeros((1, 2, 3, 4)), vocab=5)
    with pytest.raises(ValueError, match="unknown statistic"):
        rules_norm.layernorm("diag", "kernel", jnp.zeros((2, 4)), jnp.zeros((1, 2, 4)))
