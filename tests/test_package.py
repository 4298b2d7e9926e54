"""The installable package (pyproject.toml): a wheel built from the checkout holds `zf_tf`
and nothing else at the top level, installs into a fresh venv, and from another directory
gives `import zf_tf` and a `zf-tf` command that runs a mode on a shipped config.

Offline: the wheel is built with this venv's setuptools (no build isolation) and installed
with --no-deps --no-index; the fresh venv sees this venv's dependencies through a .pth
file, never the checkout."""

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

import numpy as np
import pytest
from packaging.requirements import Requirement
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, cwd, check=True):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def _wheel(tmp_path) -> str:
    """Builds the wheel from a copy of the package's files (the checkout stays clean)."""
    src = tmp_path / "src"
    shutil.copytree(
        os.path.join(ROOT, "zf_tf"), src / "zf_tf", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(src), cwd=tmp_path)  # fmt: skip
    (wheel,) = dist.iterdir()
    return str(wheel)


@pytest.mark.slow
def test_wheel_installs_and_runs_from_another_directory(tmp_path):
    wheel = _wheel(tmp_path)
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        tops = {n.split("/")[0] for n in names}
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert {t for t in tops if not t.endswith(".dist-info")} == {"zf_tf"}
    assert "zf_tf/configs/imagenette.py" in names and "zf_tf/pipelines/inputs.py" in names
    assert "zf-tf = zf_tf.__main__:run" in entry_points
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["dependencies"]
    required = {
        str(Requirement(line.split(": ", 1)[1]))
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist: ") and "extra ==" not in line
    }
    assert required == {str(Requirement(d)) for d in declared}

    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", str(venv), cwd=tmp_path)
    python = str(venv / "bin" / "python")
    _run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                cwd=tmp_path).stdout.strip()  # fmt: skip
    with open(os.path.join(site, "deps.pth"), "w") as f:  # this venv's packages, not ROOT
        f.write(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import zf_tf, zf_tf.configs.default as d, importlib.util as u;"
        "print(zf_tf.__file__); print(d.get_config().model.arch);"
        "print(u.find_spec('configs'), u.find_spec('pipelines'), u.find_spec('main'))"
    )
    lines = _run(python, "-c", code, cwd=elsewhere).stdout.split("\n")
    assert lines[0] == os.path.join(site, "zf_tf", "__init__.py")
    assert lines[1:3] == ["zfnet", "None None None"]

    command = str(venv / "bin" / "zf-tf")
    proc = _run(command, "--mode=bogus", cwd=elsewhere, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith(
        "error: flag --mode=bogus: value should be one of <train|"
    )
    assert len(proc.stderr.strip().splitlines()) == 1

    # a mode on a config named as the docs name it (configs/x.py), from another directory
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (80, 80, 3), np.uint8)).save(
        elsewhere / "x.png"
    )
    proc = _run(command, "--mode=deconv", "--untrained", "--image=x.png", "--layer=conv2",
                "--config=configs/default.py", "--workdir=w", cwd=elsewhere)  # fmt: skip
    assert "Way down (deconvnet rule)" in proc.stdout
    out = elsewhere / "w" / "deconv" / "conv2"
    assert sorted(os.listdir(out)) == ["image_x.json", "image_x.png"]
    assert Image.open(out / "image_x.png").size[0] > 0
