"""The exact Hessian diagonal beyond the GGN: the residual (activation-curvature) term on the
engine's forward pass (:class:`Residual`), and per-sample one-hot Hessian-vector products for
models outside that mechanism (:func:`generic_hessian`); the maths is in
:mod:`jaxopt_suite.curvature.hessian`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jaxopt_suite.curvature import hessian, rules
from jaxopt_suite.curvature.config import EngineConfig
from jaxopt_suite.curvature.rules.base import wide


def generic_hessian(
    apply_fn, treedef, loss_obj, c, params, inputs, targets, stats, chunk_size, config
):
    """Exact Hessian diagonals by one-hot HVPs (:func:`hessian.generic_diagonal`), with
    ``config.residual_chunk`` tangents at once and ``config.memory_budget_bytes`` checked."""

    def per_sample_loss(p, x, y):
        return c * loss_obj.per_sample(apply_fn(p, x), y)[0]

    out = {}
    for s in stats:
        tree = hessian.generic_diagonal(
            per_sample_loss,
            params,
            inputs,
            targets,
            s == "individual_sum_sq",
            chunk_size,
            config.residual_chunk,
            config.memory_budget_bytes,
        )
        out[s] = jax.tree.leaves(tree)
    return out


class Residual:
    """The residual (activation-curvature) part of ``diag_h`` on the engine's forward pass.

    Builds the instrumented forward (:func:`hessian.instrument`), runs the one VJP with a zero
    perturbation at every site output, and after :meth:`finish` has the output cotangent,
    backpropagates the eigen-columns of each site's local Hessian to the layers
    (:meth:`statistics`)."""

    def __init__(self, forward, leaves, zeros, inputs, config: EngineConfig):
        self.inputs = inputs
        self.config = config
        inst = hessian.instrument(forward, (True, True, False), leaves, zeros, inputs)
        self.sites = inst.sites
        if not self.sites:
            return
        site_zeros = [jnp.zeros(s.shape, s.dtype) for s in self.sites]

        def run(leaves, perts, site_perts):
            (out, rec), operands, hessians = inst.run(site_perts, leaves, perts, inputs)
            return (out, operands), (rec, hessians)

        (outputs, operands), full_vjp, (rec, self.hessians) = jax.vjp(
            run, leaves, zeros, site_zeros, has_aux=True
        )
        self.operand_zeros = jax.tree.map(jnp.zeros_like, operands)
        self.outputs = outputs
        self.full_vjp = full_vjp

        def vjp_fn(ct):
            g_leaves, g_perts, _ = full_vjp((ct, self.operand_zeros))
            return g_leaves, g_perts

        self.vjp = (outputs, vjp_fn, rec)

    def finish(self, g_out):
        """Second derivatives times the site cotangents -> one table of signed columns: for each
        (site, eigen-direction) a block of as many columns as the site has units."""
        site_grads = self.full_vjp((g_out, self.operand_zeros))[2]
        self.blocks = []
        offset = 0
        for s, (h, g) in enumerate(zip(self.hessians, site_grads, strict=True)):
            units = hessian.site_units(self.sites[s])
            n = g.shape[0]
            for lam, weights in hessian.directions(h, g):
                flat_w = tuple(w.reshape(n, -1) for w in weights)
                self.blocks.append((s, offset, units, lam.reshape(n, -1), flat_w))
                offset += units
        self.total = offset

    def _column(self, k):
        """Column k: cotangents of every site's operands and its sign per sample (N,)."""
        cots = [[None] * t.operands for t in self.sites]
        sign = 0.0
        for s, offset, units, lam, weights in self.blocks:
            local = k - offset
            inside = ((local >= 0) & (local < units)).astype(lam.dtype)
            j = jnp.clip(local, 0, units - 1)
            onehot = jax.nn.one_hot(j, units, dtype=lam.dtype) * inside
            scale = jnp.sqrt(jnp.abs(lam[:, j]))
            for o, w in enumerate(weights):
                part = (w[:, j] * scale)[:, None] * onehot[None]
                cots[s][o] = part if cots[s][o] is None else cots[s][o] + part
            sign = sign + inside * jnp.sign(lam[:, j])
        return cots, sign

    def _site_cotangents(self, cots):
        return [
            tuple(c.reshape(t.shape).astype(t.dtype) for c in ops)
            for t, ops in zip(self.sites, cots, strict=True)
        ]

    def statistics(self, stats, calls, owner, prepared, free, leaves, apply_fn, treedef, chunk):
        """The residual part of each statistic per leaf (to add to the GGN's)."""
        out = {st: [jnp.zeros(()) for _ in leaves] for st in stats}
        if owner:
            for i, values in self._structured(stats, calls, owner, prepared).items():
                for st in stats:
                    out[st][i] = values[st]
        if free:
            self._generic(stats, free, leaves, apply_fn, treedef, chunk, out)
        return out

    def _structured(self, stats, calls, owner, prepared):
        """Backpropagates the columns to the layers, ``config.residual_chunk`` at a time
        (``lax.scan`` over chunks, ``vmap`` inside: the memory of one chunk), and accumulates
        the statistics of the positive columns minus those of the negative ones."""
        out_zero = jnp.zeros_like(self.outputs)
        order = sorted(owner.items())
        chunk = min(self.config.residual_chunk, self.total)
        steps = -(-self.total // chunk)

        def stat(ci, role, delta):
            call, x, config = calls[ci], prepared[ci], self.config
            return {st: rules.layer_statistic(st, call, role, x, delta, config) for st in stats}

        def backward(k):
            cots, sign = self._column(k)
            return self.full_vjp((out_zero, self._site_cotangents(cots)))[1], sign

        def body(acc, ks):
            deltas, sign = jax.vmap(backward)(ks)  # (B, N, ...) per layer, (B, N)
            new = []
            for (_, (ci, role)), old in zip(order, acc, strict=True):
                d = wide(deltas[ci])
                shape = (*sign.shape, *([1] * (d.ndim - 2)))
                pos = stat(ci, role, d * (sign > 0).reshape(shape))
                neg = stat(ci, role, d * (sign < 0).reshape(shape))
                new.append({st: old[st] + pos[st] - neg[st] for st in stats})
            return new, None

        init = []
        for _, (ci, role) in order:
            zero = jnp.zeros((1, *calls[ci].output.shape), jnp.float32)
            shapes = jax.eval_shape(lambda ci=ci, role=role, zero=zero: stat(ci, role, zero))
            init.append({st: jnp.zeros(v.shape, v.dtype) for st, v in shapes.items()})
        # columns past the end fall in no block: zero cotangents and sign 0
        ks = jnp.arange(steps * chunk).reshape(steps, chunk)
        acc, _ = jax.lax.scan(body, init, ks)
        return {i: a for (i, _), a in zip(order, acc, strict=True)}

    def _column_at(self, k, n):
        """Column k of sample n: the cotangents of every site's operands, concatenated in the
        order of :meth:`_generic`'s ``apply_sites`` (D,), and its sign."""
        parts = [[None] * t.operands for t in self.sites]
        sign = 0.0
        for s, offset, units, lam, weights in self.blocks:
            local = k - offset
            inside = ((local >= 0) & (local < units)).astype(lam.dtype)
            j = jnp.clip(local, 0, units - 1)
            onehot = jax.nn.one_hot(j, units, dtype=lam.dtype) * inside
            scale = jnp.sqrt(jnp.abs(lam[n, j]))
            for o, w in enumerate(weights):
                part = (w[n, j] * scale) * onehot
                parts[s][o] = part if parts[s][o] is None else parts[s][o] + part
            sign = sign + inside * jnp.sign(lam[n, j])
        return jnp.concatenate([c for ops in parts for c in ops]), sign

    def _generic(self, stats, free, leaves, apply_fn, treedef, chunk, out):
        r"""Free leaves: the residual per sample, with the model re-interpreted on one sample
        and every site's operands :math:`u` as its output, in the cheaper direction:

        .. math:: \sum_k \operatorname{sign}_{k,n} (J_n^\top c_{k,n})^{\odot 2}
           = \sum_{j,d} \lambda_{d,n,j} \big(\partial (w_d^\top u)_{n,j} / \partial\theta
           \big)^{\odot 2},

        by one VJP per column :math:`c_{k,n}` (K per sample, :meth:`_reverse`) when the free
        leaves have more entries than K, else by one JVP per free parameter
        (:meth:`_forward`). Either runs ``config.residual_chunk`` columns or tangents at a
        time (a loop) for ``chunk`` samples at a time (``lax.map``): the memory of that many
        products on one sample, whatever K and the number of parameters."""
        single = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype), self.inputs
        )
        inst = hessian.instrument(
            lambda ls, x: apply_fn(jax.tree.unflatten(treedef, ls), x),
            (True, False),
            [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in leaves],
            single,
        )
        if [(t.shape[1:], t.operands) for t in self.sites] != [
            (t.shape[1:], t.operands) for t in inst.sites
        ]:
            raise ValueError(
                "diag_h: the model's nonlinear nodes differ between a batch of one sample and "
                "the full batch; the model must treat samples alike"
            )
        site_zeros = [jnp.zeros((1, *t.shape[1:]), t.dtype) for t in inst.sites]

        def apply_sites(free_leaves, x_n):
            """Every site's operands on the one sample ``x_n``, concatenated: (D,)."""
            full = list(leaves)
            for j, leaf in zip(free, free_leaves, strict=True):
                full[j] = leaf
            x = jax.tree.map(lambda a: a[None], x_n)
            operands = inst.run(site_zeros, full, x)[1]
            return jnp.concatenate([o.reshape(-1) for ops in operands for o in ops])

        free_leaves = [leaves[j] for j in free]
        size = sum(leaf.size for leaf in free_leaves)
        n = self.outputs.shape[0]
        batch = n if chunk is None else min(chunk, n)
        direction = self._reverse if size > self.total else self._forward
        step, count, per_sample = direction(apply_sites, free_leaves)
        width = min(self.config.residual_chunk, count)
        ids = jnp.arange(-(-count // width) * width).reshape(-1, width)
        hessian.check_budget(
            jax.vmap(step, in_axes=(0, 0, None)),
            (
                jax.tree.map(
                    lambda a: jax.ShapeDtypeStruct((batch, *a.shape[1:]), a.dtype), self.inputs
                ),
                jax.ShapeDtypeStruct((batch,), jnp.int32),
                jax.ShapeDtypeStruct((width,), jnp.int32),
            ),
            self.config.memory_budget_bytes,
            f"the residual of the leaves no rule covers ({self.total} columns, {size} "
            f"parameters, {n} samples; {batch} samples x {width} products at once)",
        )
        found = jax.lax.map(
            lambda xn: per_sample(*xn, ids), (self.inputs, jnp.arange(n)), batch_size=batch
        )
        for st in stats:
            for j, v in zip(free, found, strict=True):
                value = v if st == "individual_sum_sq" else jnp.sum(v, axis=0)
                out[st][j] = out[st][j] + value

    def _reverse(self, apply_sites, free_leaves):
        """``(step, K, per_sample)``: ``step(x_n, n, ks)`` sums sign x squared VJP of the
        columns ``ks`` per free leaf; ``per_sample(x_n, n, chunks)`` runs the steps."""

        def step(x_n, n, ks):
            sites_out, vjp = jax.vjp(lambda ls: apply_sites(ls, x_n), free_leaves)
            cols, signs = jax.vmap(lambda k: self._column_at(k, n))(ks)  # (B, D), (B,)
            grads = jax.vmap(lambda col: vjp(col.astype(sites_out.dtype))[0])(cols)
            return [jnp.tensordot(signs, wide(g) ** 2, axes=1) for g in grads]

        def per_sample(x_n, n, chunks):
            zeros = [jnp.zeros(leaf.shape, wide(leaf).dtype) for leaf in free_leaves]

            def body(acc, ks):
                return [a + b for a, b in zip(acc, step(x_n, n, ks), strict=True)], None

            return jax.lax.scan(body, zeros, chunks)[0]

        return step, self.total, per_sample

    def _forward(self, apply_sites, free_leaves):
        r"""``(step, P, per_sample)``: ``step(x_n, n, ids)`` is
        :math:`\sum_{j,d} \lambda_{d,n,j} (w_d^\top \partial u_{n,j} / \partial\theta_i)^2` for
        the flat free parameters i in ``ids`` (one JVP each, one-hot tangents);
        ``per_sample(x_n, n, chunks)`` runs the steps and returns it per free leaf."""
        flat, unravel = ravel_pytree(free_leaves)
        size = flat.shape[0]
        starts, offset = [], 0  # where each site operand's units start in apply_sites' output
        for t in self.sites:
            starts.append([offset + o * hessian.site_units(t) for o in range(t.operands)])
            offset += t.operands * hessian.site_units(t)

        def step(x_n, n, ids):
            def derivative(i):
                tangent = unravel(jax.nn.one_hot(i, size, dtype=flat.dtype))
                return jax.jvp(lambda ls: apply_sites(ls, x_n), (free_leaves,), (tangent,))[1]

            du = wide(jax.vmap(derivative)(ids))  # (B, D)
            total = jnp.zeros(ids.shape, du.dtype)
            for s, _, units, lam, weights in self.blocks:
                proj = sum(
                    w[n] * du[:, start : start + units]
                    for w, start in zip(weights, starts[s], strict=True)
                )
                total = total + jnp.sum(lam[n] * proj**2, axis=-1)
            return total

        def per_sample(x_n, n, chunks):
            values = jax.lax.map(lambda ids: step(x_n, n, ids), chunks).reshape(-1)[:size]
            return jax.tree.leaves(unravel(values.astype(flat.dtype)))

        return step, size, per_sample
