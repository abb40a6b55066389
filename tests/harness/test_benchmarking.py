import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np
import pytest

from jaxopt_suite import benchmarking


def test_time_interleaved_ratios_and_memory():
    x = jnp.ones((64, 64))
    small = jax.jit(lambda a: a @ a)
    big = jax.jit(lambda a: (a @ a) @ a @ a)
    out = benchmarking.time_interleaved(
        {"small": (small, (x,)), "big": (big, (x,))},
        baseline="small",
        repeats=3,
        number=2,
        warmup=1,
    )
    assert out["small"].ratio == pytest.approx(1.0)
    assert out["big"].ratio == pytest.approx(out["big"].median / out["small"].median)
    assert len(out["big"].samples) == 3
    # argument: one 64x64 float32 input; output: one 64x64 float32 result.
    assert out["small"].memory["argument"] == 64 * 64 * 4
    assert out["small"].memory["output"] == 64 * 64 * 4
    with pytest.raises(ValueError, match="baseline"):
        benchmarking.time_interleaved({"a": (small, (x,))}, baseline="b")


def test_time_interleaved_rotates_which_function_goes_first():
    calls = []

    def timed(name):
        def fn(a):
            jax.experimental.io_callback(lambda: calls.append(name), None, ordered=True)
            return a + 1

        return jax.jit(fn)

    x = jnp.ones(3)
    fns = {n: (timed(n), (x,)) for n in "abc"}
    benchmarking.time_interleaved(fns, baseline="a", repeats=4, number=1, warmup=2)
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == 6 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b", "c"]


def test_compiled_memory_counts_donation():
    x = jnp.ones((128,), jnp.float32)
    plain = jax.jit(lambda a: a + 1).lower(x).compile()
    donated = jax.jit(lambda a: a + 1, donate_argnums=0).lower(x).compile()
    m_plain = benchmarking.compiled_memory(plain)
    m_donated = benchmarking.compiled_memory(donated)
    assert m_plain["total"] == 2 * 128 * 4 + m_plain["temp"]
    assert m_donated["alias"] == 128 * 4
    assert m_donated["total"] == m_plain["total"] - 128 * 4


def test_write_json_records_environment(tmp_path):
    path = benchmarking.write_json(tmp_path / "a" / "r.json", {"x": np.arange(3)})
    text = path.read_text()
    assert '"backend"' in text and '"x": [\n    0,' in text
