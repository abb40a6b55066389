"""Run a test body on 8 simulated CPU devices.

XLA fixes the number of host devices when JAX starts, so the body runs in a fresh Python
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. The body is source code;
it should ``assert`` what it checks and may ``print`` diagnostics (shown on failure).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def run_on_devices(
    body: str, num_devices: int = 8, timeout: float = 600, fast_compile: bool = True
) -> str:
    """Executes ``body`` in a subprocess with ``num_devices`` CPU devices; returns its stdout.

    ``fast_compile`` turns XLA's backend (LLVM) optimisations and the CPU fusion emitters off
    in the subprocess (as tests/conftest.py does): the tiny test programs then compile several
    times faster and run no slower that matters; every
    comparison inside the body is between programs compiled the same way.

    Raises AssertionError with the subprocess output if the body fails.
    """
    env = dict(os.environ)
    flags = f" --xla_force_host_platform_device_count={num_devices}"
    if fast_compile:
        flags += " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + flags).strip()
    env["JAX_PLATFORMS"] = "cpu"
    prelude = f"import jax\nassert jax.device_count() == {num_devices}, jax.devices()\n"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(body)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"multi-device body failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc.stdout
