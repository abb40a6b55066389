"""DP-SGD on MNIST with the engine's per-sample clipping: test accuracy at a target (ε, δ).

A small tanh CNN (Papernot et al., *Tempered Sigmoid Activations for Deep Learning with
Differential Privacy*, 2021: Conv 16 8x8/2 - max-pool 2/1 - Conv 32 4x4/2 - max-pool 2/1 -
Dense 32 - Dense 10, tanh), Poisson-sampled batches padded to a fixed size with a mask
(:func:`jaxopt_suite.privacy.poisson_batch`), the noise multiplier picked for the target ε at
δ over the run's steps (:func:`~jaxopt_suite.privacy.noise_multiplier_for`), and the ε spent
reported by the RDP and PLD accountants (:func:`~jaxopt_suite.privacy.epsilon`).

Run: ``flock /tmp/jaxopt_bench.lock .venv/bin/python -m benchmarks.bench_privacy_mnist``
Writes ``benchmarks/results/privacy_mnist.json`` and appends to ``privacy_mnist.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxopt_suite import data, privacy

RESULTS = Path(__file__).parent / "results"


class TanhCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(16, (8, 8), strides=2, padding=3)(x))
        x = nn.max_pool(x, (2, 2), strides=(1, 1))
        x = nn.tanh(nn.Conv(32, (4, 4), strides=2, padding="VALID")(x))
        x = nn.max_pool(x, (2, 2), strides=(1, 1))
        x = nn.tanh(nn.Dense(32)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, default=2.9)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=float, default=15)
    parser.add_argument("--batch", type=int, default=256, help="expected batch size")
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    command = "python -m benchmarks.bench_privacy_mnist " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
    )
    ds = data.load_mnist()
    n = len(ds.train_images)
    q = args.batch / n
    steps = int(args.epochs * n / args.batch)
    sigma = privacy.noise_multiplier_for(args.epsilon, args.delta, q, steps)
    padded = privacy.padded_batch_size(n, q)
    print(f"q={q:.5f} steps={steps} sigma={sigma:.4f} padded batch={padded}", flush=True)

    model = TanhCNN()
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    params = model.init(jax.random.key(args.seed), jnp.zeros((1, 28, 28, 1)))["params"]
    grad_fn = privacy.clipped_value_and_grad(
        apply_fn, loss="cross_entropy", max_norm=args.max_norm, reduction="sum"
    )
    tx = privacy.dp_sgd(
        args.lr,
        noise_multiplier=sigma,
        max_norm=args.max_norm,
        expected_batch_size=args.batch,
        key=jax.random.key(args.seed + 1),
        momentum=args.momentum or None,
    )

    @jax.jit
    def step(params, state, images, labels, mask):
        value, summed, _ = grad_fn(params, data.normalize(images), labels, weights=mask)
        updates, state = tx.update(summed, state, params)
        return optax.apply_updates(params, updates), state, value

    @jax.jit
    def correct(params, images, labels):
        return jnp.sum(apply_fn(params, data.normalize(images)).argmax(-1) == labels)

    def accuracy(params):
        hits = sum(
            int(correct(params, ds.test_images[i : i + 1000], ds.test_labels[i : i + 1000]))
            for i in range(0, len(ds.test_images), 1000)
        )
        return hits / len(ds.test_images)

    rng = np.random.default_rng(args.seed)
    state = tx.init(params)
    curve = []
    start = time.perf_counter()
    for t in range(1, steps + 1):
        idx, mask = privacy.poisson_batch(rng, n, q, padded)
        params, state, _ = step(params, state, ds.train_images[idx], ds.train_labels[idx], mask)
        if t % max(1, steps // 10) == 0 or t == steps:
            acc = accuracy(params)
            eps = privacy.epsilon(sigma, q, t, args.delta)
            curve.append({"step": t, "test_accuracy": acc, "epsilon_rdp": eps})
            print(f"step {t}: test accuracy {acc:.4f}, epsilon {eps:.3f}", flush=True)
    wall = time.perf_counter() - start
    final = {
        "command": command,
        "noise_multiplier": sigma,
        "sampling_rate": q,
        "steps": steps,
        "delta": args.delta,
        "epsilon_rdp": privacy.epsilon(sigma, q, steps, args.delta, accountant="rdp"),
        "epsilon_pld": privacy.epsilon(sigma, q, steps, args.delta, accountant="pld"),
        "test_accuracy": curve[-1]["test_accuracy"],
        "wall_s": wall,
        "load_average": os.getloadavg(),
        "curve": curve,
    }
    print(json.dumps({k: v for k, v in final.items() if k != "curve"}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "privacy_mnist.json").write_text(json.dumps(final, indent=1))
    line = (
        f"| `{command}` | {sigma:.3f} | {steps} | {final['epsilon_rdp']:.2f} | "
        f"{final['epsilon_pld']:.2f} | {final['test_accuracy']:.4f} | {wall:.0f} |\n"
    )
    md = RESULTS / "privacy_mnist.md"
    if not md.exists():
        md.write_text(
            "# DP-SGD on MNIST (tanh CNN, Poisson sampling, engine clipping), δ = 1e-5\n\n"
            "| command | σ | steps | ε (RDP) | ε (PLD) | test accuracy | wall s |\n"
            "| --- | --- | --- | --- | --- | --- | --- |\n"
        )
    with md.open("a") as f:
        f.write(line)


if __name__ == "__main__":
    main()
