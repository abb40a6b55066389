import os

# Tests run on CPU with tiny shapes. jaxlib hands LAPACK calls (cholesky, eigh) to OpenBLAS,
# whose own threads fight XLA's for the 2 cores; one thread is faster here.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Compilation dominates the suite (XLA's backend compile is ~70 % of a curvature test's time),
# and tiny shapes gain nothing from what makes it slow: XLA's backend (LLVM) optimisations,
# which roughly double it, and the CPU backend's MLIR fusion emitters, ~2.5x slower to compile
# than the classic elemental emitters (user CPU of three curvature tests 25 s -> 16 s with
# both off). Turn both off for every test, for the notebook kernels (which inherit this
# environment) and for the multi-device subprocesses (tests/multidevice.py). Results are
# unchanged up to float32 rounding. Benchmarks never run under these flags.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
for _flag in FAST_COMPILE_FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_flag}".strip()
