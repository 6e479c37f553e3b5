"""edgeferry installs and runs outside the checkout: an sdist is built from a copy of the
source, a wheel from the sdist, and the wheel is installed into a fresh venv in a temp
directory, where ``edgeferry demo --help`` and a short demo run.

To keep it to seconds the wheel is built without build isolation (setuptools comes from
the dev extra) and installed with ``--no-deps``; the fresh venv reaches the third-party
dependencies through a .pth line naming this venv's site-packages. Such a line adds the
directory only: the editable install of the checkout found there (a .pth file of its
own) is not processed, so ``edgeferry`` can only come from the wheel, which the test
checks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFS = ("edge.conf", "cloud.conf")


def test_deploy_configs_are_the_package_data():
    """deploy/mosquitto/ is what people read and deploy; edgeferry/data/mosquitto/ is what
    the package carries for the demo (and what the tests and benchmarks start). They are
    one file in two places: change both (cp one over the other)."""
    deploy = REPO / "deploy" / "mosquitto"
    data = REPO / "edgeferry" / "data" / "mosquitto"
    # (deploy/mosquitto/ may hold more, for deployments only)
    assert sorted(p.name for p in data.glob("*.conf")) == sorted(CONFS)
    for name in CONFS:
        assert (deploy / name).read_bytes() == (data / name).read_bytes(), (
            f"deploy/mosquitto/{name} and edgeferry/data/mosquitto/{name} differ: make them the same")


def _run(args: list[str | Path], cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    r = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{args} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv outside the checkout with the wheel installed; returns its bin/."""
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "results", "*.db*", "*.so"))
    r = _run([sys.executable, "-c", "from setuptools import build_meta as b; print(b.build_sdist('dist'))"],
             src)
    sdist = src / "dist" / r.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp / "sdist", filter="data")
    (unpacked,) = (tmp / "sdist").iterdir()
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", tmp / "wheels", unpacked], tmp)
    (wheel,) = (tmp / "wheels").glob("edgeferry-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    py = venv / "bin" / "python"
    purelib = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip()
    (Path(purelib) / "edgeferry_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel], tmp)
    return venv / "bin"


def test_the_wheel_is_what_runs(venv: Path):
    out = _run([venv / "python", "-c",
                "import edge, gateway, firmware_sim, edgeferry.procs as p; "
                "print(p.EDGE_CONF); print(p.CLOUD_CONF); print(gateway.__file__)"], venv.parent).stdout
    paths = [Path(line) for line in out.split()]
    for path in paths:
        assert path.is_relative_to(venv.parent), f"{path} is not from the installed wheel"
        assert path.is_file()
    site = paths[0].parents[3]  # .../site-packages/edgeferry/data/mosquitto/edge.conf
    for pkg in ("edge", "gateway", "firmware_sim", "edgeferry"):
        assert (site / pkg / "py.typed").is_file(), f"{pkg}/py.typed is not in the wheel"
    assert list(site.glob("edgeferry-*.dist-info/licenses/LICENSE")), "LICENSE is not in the wheel"


def test_the_wheel_carries_the_c_accelerator(venv: Path):
    """Built from edge/_cparse.c in the sdist (the copy of the checkout holds no .so),
    imported from the wheel, and taken by a raw decoder there."""
    if not shutil.which(sysconfig.get_config_var("CC").split()[0]) or not (
            Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        pytest.skip("no C compiler or Python headers here: the wheel is built without the accelerator")
    out = _run([venv / "python", "-c", "import edge._cparse as c, edge._codec as d; print(c.__file__, d.PARSE_PATH)"],
               venv.parent).stdout.split()
    assert Path(out[0]).is_relative_to(venv.parent) and out[1] == "c", out


def test_demo_help_outside_the_checkout(venv: Path):
    r = _run([venv / "edgeferry", "demo", "--help"], venv.parent)
    assert "Example: edgeferry demo" in r.stdout


def test_short_demo_outside_the_checkout(venv: Path):
    r = _run([venv / "edgeferry", "demo", "--devices", "3", "--duration", "8", "--outage-at", "2",
              "--outage-for", "2", "--no-dashboard"], venv.parent, timeout=120)
    print(r.stdout[-1500:])
    assert "sent" in r.stdout and "delivered" in r.stdout
