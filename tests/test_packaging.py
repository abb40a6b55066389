"""The built distributions: ``python -m build`` makes an sdist and a wheel, the wheel holds the
package only, and both install into a fresh virtual environment where one jitted step of each
method runs from the installed copy (not this source tree).

The fresh environments reuse this environment's dependencies (jax, optax, flax) through a
``.pth`` line instead of downloading them; a path added that way does not run this
environment's own ``.pth`` files, so the editable install of the source tree stays invisible.
"""

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import jaxopt_suite

ROOT = Path(__file__).resolve().parents[1]
VERSION = jaxopt_suite.__version__

pytestmark = pytest.mark.slow

# One jitted step of each method on a tiny MLP, from the installed package.
SMOKE = r"""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import jaxopt_suite
from jaxopt_suite import precondition
from jaxopt_suite.harness import data, train, zoo
from jaxopt_suite.proxprop import ProxPropDense

site = Path(sys.argv[1]).resolve()
assert Path(jaxopt_suite.__file__).resolve().is_relative_to(site), jaxopt_suite.__file__
assert (site / "jaxopt_suite" / "py.typed").is_file()
if len(sys.argv) > 2:  # import only
    raise SystemExit(0)

ds = data.synthetic(jax.random.key(0), num_train=16, num_test=8)
runs = {
    "alig": (zoo.MLP(hidden=(8,)), jaxopt_suite.alig(0.1), train.backprop),
    "proximal": (
        zoo.MLP(hidden=(8,)),
        optax.chain(optax.sgd(0.1), jaxopt_suite.group_sparsity(0.01, 0.1)),
        train.backprop,
    ),
    "curvature": (
        zoo.MLP(hidden=(8,)),
        precondition.diag_ggn_sgd(0.01, damping=1.0),
        train.curvature_gradient("diag_ggn_mc"),
    ),
    "forward_gradient": (
        zoo.MLP(hidden=(8,)),
        optax.chain(jaxopt_suite.forward_gradient(jax.random.key(1)), optax.sgd(1e-3)),
        train.value_fn_gradient,
    ),
    "proxprop": (zoo.MLP(hidden=(8,), dense=ProxPropDense), optax.sgd(0.1), train.backprop),
}
for name, (model, tx, gradient) in runs.items():
    problem = train.Problem(lambda p, x, model=model: model.apply({"params": p}, x))
    params = zoo.init_params(model, jax.random.key(2))
    step = train.jit_step(train.make_step(problem, tx, gradient))
    state, loss = step(train.init_state(params, tx, jax.random.key(3)), ds.train_images[:8],
                       ds.train_labels[:8])
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.any(a != b), state.params, params))
    assert bool(jnp.isfinite(loss)) and int(state.skipped) == 0 and any(moved), name
    print(name, float(loss))
"""


def _build(outdir: Path) -> tuple[Path, Path]:
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(outdir), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
    )
    return (
        outdir / f"jaxopt_suite-{VERSION}-py3-none-any.whl",
        outdir / f"jaxopt_suite-{VERSION}.tar.gz",
    )


def _purelib(python: Path) -> Path:
    query = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    out = subprocess.run([python, "-c", query], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def _fresh_venv(path: Path) -> Path:
    """A new virtual environment that sees this one's dependencies but not its packages'
    ``.pth`` hooks (the editable install)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = _purelib(python)
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _install(python: Path, dist: Path) -> Path:
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"),
            *("--no-deps", "--no-build-isolation", "--no-index", str(dist)),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return _purelib(python)


def _smoke(python: Path, site: Path, tmp_path: Path, *extra: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [python, "-c", SMOKE, str(site), *extra],
        cwd=tmp_path,  # not the repository root, whose jaxopt_suite/ would shadow the install
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_wheel_and_sdist_install_and_run(tmp_path):
    wheel, sdist = _build(tmp_path / "dist")

    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"jaxopt_suite-{VERSION}.dist-info/"
    assert all(n.startswith(("jaxopt_suite/", dist_info)) for n in names), names
    assert "jaxopt_suite/py.typed" in names
    assert f"{dist_info}licenses/LICENSE" in names
    assert not [n for n in names if n.endswith((".ipynb", ".json", ".png", ".md"))]
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}METADATA").decode()
    assert "Author: jaxopt_suite developers" in metadata
    assert "License-Expression: MIT" in metadata
    with tarfile.open(sdist) as tar:
        members = {
            Path(m).relative_to(f"jaxopt_suite-{VERSION}").as_posix()
            for m in tar.getnames()
            if "/" in m
        }
    assert {"LICENSE", "pyproject.toml", "jaxopt_suite/py.typed"} <= members

    python = _fresh_venv(tmp_path / "wheel-env")
    out = _smoke(python, _install(python, wheel), tmp_path)
    assert out.split()[::2] == ["alig", "proximal", "curvature", "forward_gradient", "proxprop"]

    python = _fresh_venv(tmp_path / "sdist-env")
    _smoke(python, _install(python, sdist), tmp_path, "import-only")
