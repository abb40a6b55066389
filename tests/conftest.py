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


def pytest_collection_modifyitems(config, items):
    """Longest first: with ``-n 2`` the suite's wall time is the busier worker's, so the
    8-device subprocess (the longest test), the notebooks and the tests marked ``slow`` are
    handed out before the many short tests that then even out the two workers."""

    def rank(item):
        if item.get_closest_marker("multidevice") and item.get_closest_marker("slow"):
            return 0
        if item.nodeid.endswith(".ipynb") or ".ipynb::" in item.nodeid:
            return 1
        return 2 if item.get_closest_marker("slow") else 3

    items.sort(key=rank)  # stable: the order within each rank is kept
