import os

# Tests run on CPU with tiny shapes; keep XLA from grabbing every core per process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
