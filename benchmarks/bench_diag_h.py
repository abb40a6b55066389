"""``diag_h`` on a GroupNorm CNN (about 10k parameters): compiled memory and time per call.

GroupNorm's scale and bias have no rule, so the residual (activation-curvature) part of
``diag_h`` for them takes the per-sample path (``Residual._generic``); before the fix it
backpropagated every residual column at once. The model: three 3x3 convolutions (16, 32, 16
channels), each followed by GroupNorm (4 groups) and ReLU, a spatial mean and a Dense layer
(10 classes), on ``--size`` x ``--size`` x 1 inputs, batch ``--batch``, cross-entropy.

Each ``chunk_size`` is compiled first and its compiled memory read
(``memory_analysis()``); only those whose total stays under ``--max-gb`` are run and timed,
interleaved with the plain ``jax.value_and_grad`` (``benchmarking.time_interleaved``, the
ratios are relative to it). ``--code DIR`` imports ``jaxopt_suite`` from DIR instead (a copy
of an older commit, e.g. ``git archive 8ae2ba1 jaxopt_suite | tar -x -C DIR``), and
``--compile-only`` skips the timing (for code whose memory would not fit). Each run stores
its part under ``--label`` in ``results/diag_h_memory.json`` and rewrites
``results/diag_h_memory.md`` from all parts::

    nice -n 10 .venv/bin/python -m benchmarks.bench_diag_h --label before --code /tmp/old \\
        --compile-only
    nice -n 10 .venv/bin/python -m benchmarks.bench_diag_h --label after
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import time

RESULTS = pathlib.Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--code", default=None, help="import jaxopt_suite from this directory")
    parser.add_argument("--compile-only", action="store_true")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--chunks", default="none,8,1", help="chunk_size values ('none': all)")
    parser.add_argument("--max-gb", type=float, default=6.0, help="largest total run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    if args.code:
        sys.path.insert(0, args.code)

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from jaxopt_suite import curvature
    from jaxopt_suite.harness import benchmarking

    class GroupNormCNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            for channels in (16, 32, 16):
                x = nn.relu(nn.GroupNorm(num_groups=4)(nn.Conv(channels, (3, 3))(x)))
            return nn.Dense(10)(x.mean(axis=(1, 2)))

    model = GroupNormCNN()
    x = jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, 1))
    y = jax.random.randint(jax.random.key(2), (args.batch,), 0, 10)
    params = model.init(jax.random.key(0), x)["params"]

    def apply(p, x):
        return model.apply({"params": p}, x)

    def loss(p):
        logits = apply(p, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))

    part = {
        "code": args.code or "this commit",
        "parameters": sum(a.size for a in jax.tree.leaves(params)),
        "batch": args.batch,
        "input": [args.size, args.size, 1],
        "load": _uptime(),
        "runs": {},
    }
    fns = {"jax.value_and_grad": (jax.jit(lambda p: jax.value_and_grad(loss)(p)), (params,))}
    for text in args.chunks.split(","):
        chunk = None if text == "none" else int(text)
        fn = curvature.value_and_grad(
            apply, loss="cross_entropy", quantities=("diag_h",), chunk_size=chunk
        )
        jitted = jax.jit(lambda p, fn=fn: fn(p, x, y)[2])
        start = time.perf_counter()
        compiled = jitted.lower(params).compile()
        memory = benchmarking.compiled_memory(compiled)
        name = f"diag_h chunk_size={text}"
        part["runs"][name] = {"compile_s": time.perf_counter() - start, "memory": memory}
        print(name, part["runs"][name], flush=True)
        if not args.compile_only and memory["total"] < args.max_gb * 2**30:
            fns[name] = (jitted, (params,))
    if not args.compile_only:
        timings = benchmarking.time_interleaved(
            fns, baseline="jax.value_and_grad", repeats=args.repeats, number=1, warmup=args.warmup
        )
        for name, t in timings.items():
            run = part["runs"].setdefault(name, {"memory": t.memory})
            run.update(median_s=t.median, ratio=t.ratio, samples_s=t.samples.tolist())
            print(name, f"{t.median:.3f} s", f"x{t.ratio:.1f}", flush=True)
        part["load_during"] = f"load after the timing: `{_uptime()}`"
    path = RESULTS / "diag_h_memory.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[args.label] = part
    path.write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / "diag_h_memory.md").write_text(_markdown(data))


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _markdown(data: dict) -> str:
    lines = [
        "# diag_h on a GroupNorm CNN: compiled memory and time",
        "",
        "`benchmarks/bench_diag_h.py` (command in its docstring). Compiled memory from",
        "`memory_analysis()` (temp: scratch on top of arguments and outputs); time: median",
        "seconds per call, interleaved with the plain `jax.value_and_grad` (ratio to it), after",
        "compilation; runs whose compiled total exceeds `--max-gb` are compiled, not run.",
        "`chunk_size` bounds the per-sample paths (GroupNorm's scale and bias here); what",
        "remains after the fix is the residual of the Conv and Dense layers, backpropagated",
        "`EngineConfig.residual_chunk` columns of the whole batch at a time.",
        "",
    ]
    for label, part in data.items():
        lines += [
            f"## {label} ({part['code']})",
            "",
            f"{part['parameters']} parameters, batch {part['batch']}, input "
            f"{'x'.join(map(str, part['input']))}; load: `{part['load']}`",
            *([f"({part['load_during']})"] if "load_during" in part else []),
            "",
            "| run | temp (GB) | total (GB) | compile (s) | time (s) | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for name, run in part["runs"].items():
            mem = run["memory"]
            timed = (
                (f"{run['median_s']:.3f}", f"{run['ratio']:.1f}")
                if "median_s" in run
                else ("not run", "")
            )
            compile_s = f"{run['compile_s']:.1f}" if "compile_s" in run else ""
            lines.append(
                f"| {name} | {mem['temp'] / 1e9:.3f} | {mem['total'] / 1e9:.3f} | {compile_s} "
                f"| {timed[0]} | {timed[1]} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
