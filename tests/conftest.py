import os

# Tests run on CPU with tiny shapes. jaxlib hands LAPACK calls (cholesky, eigh) to OpenBLAS,
# whose own threads fight XLA's for the 2 cores; one thread is faster here.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
