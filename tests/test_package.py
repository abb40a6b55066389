import subprocess
import sys

import pytest

import jaxopt_suite


def test_import_is_fast_and_light():
    code = (
        "import time, sys; t = time.perf_counter(); import jaxopt_suite; "
        "print(time.perf_counter() - t, 'torch' in sys.modules, 'matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, torch, mpl = out.stdout.split()
    assert float(seconds) < 2.0
    assert torch == "False" and mpl == "False"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        jaxopt_suite.nonexistent  # noqa: B018


def test_exported_names_resolve():
    for name in jaxopt_suite.__all__:
        try:
            getattr(jaxopt_suite, name)
        except ModuleNotFoundError as err:  # a method module not written yet
            pytest.fail(f"jaxopt_suite.{name} does not resolve: {err}")
