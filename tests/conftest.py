import os

# Tests run on CPU with tiny shapes. jaxlib hands LAPACK calls (cholesky, eigh) to OpenBLAS,
# whose own threads fight XLA's for the 2 cores; one thread is faster here.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# Compilation dominates the suite, and XLA's backend (LLVM) optimisations roughly double it
# while tiny shapes gain nothing from them: turn them off for every test and for the notebook
# kernels (which inherit this environment). Results are unchanged; the whole suite takes about
# 7 minutes on 2 cores instead of 9. Benchmarks never run under this flag.
_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
