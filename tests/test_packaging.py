"""srupp as a user gets it: a wheel built from the source tree, installed into a fresh virtual
environment, run from a directory outside any checkout; and the same without a C compiler."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_FILES = ["pyproject.toml", "setup.py", "README.md", "LICENSE", "src"]

pytestmark = pytest.mark.slow


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment minus anything that would point Python at this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SRUPP_CONFIGS", "SRUPP_CPU_ISA")}
    return env | extra


def build_wheel(tmp: Path, from_sdist: bool = False, **env: str) -> Path:
    """Copy the source tree (no build leftovers) and build a wheel from it, or from an sdist built
    from it, with this interpreter's setuptools (no download of build requirements)."""
    tree = tmp / "tree"
    for name in SOURCE_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tree / name, ignore=shutil.ignore_patterns("*.so", "__pycache__", "*.egg-info"))
        else:
            tree.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, tree / name)
    dist = tmp / "dist"
    source = tree
    if from_sdist:
        subprocess.run(
            [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist), str(tree)],
            check=True,
            env=clean_env(**env),
            timeout=300,
            capture_output=True,
        )
        (source,) = dist.glob("srupp-*.tar.gz")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(source)],
        check=True,
        env=clean_env(**env),
        timeout=300,
    )
    (wheel,) = dist.glob("srupp-*.whl")
    return wheel


def install(tmp: Path, wheel: Path) -> Path:
    """A fresh venv holding only the wheel; torch and the other dependencies come from this
    interpreter's site-packages through a .pth file (a path listed there is searched, but its own
    .pth files, such as a development install of srupp, are not run)."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], *site.getsitepackages()}
    (Path(purelib) / "srupp-test-deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True,
        env=clean_env(),
        timeout=300,
    )
    return venv


def run(venv: Path, args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    result = subprocess.run(
        args, cwd=cwd, env=clean_env(OMP_NUM_THREADS="2"), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = build_wheel(tmp, from_sdist=True)
    return wheel, install(tmp, wheel), tmp


def test_wheel_contents(installed):
    wheel, _, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    for wanted in ("srupp/configs/demo.json", "srupp/configs/tiny.json", "srupp/py.typed", "srupp/ops/csrc/sru_cpu.c"):
        assert wanted in names, f"{wanted} is missing from {wheel.name}"
    assert "srupp/ops/_sru_cpu.so" in names, names  # no CPython tag: a ctypes library has no Python ABI
    assert any(n.endswith("licenses/LICENSE") for n in names), names
    # Any Python 3, this platform; matplotlib only with the `plot` extra.
    assert wheel.name.startswith("srupp-0.1.0-py3-none-") and not wheel.name.endswith("-any.whl"), wheel.name
    metadata = zipfile.ZipFile(wheel).read("srupp-0.1.0.dist-info/METADATA").decode()
    matplotlib = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: matplotlib")]
    assert matplotlib and all('extra == "' in line for line in matplotlib), matplotlib
    assert 'extra == "plot"' in " ".join(matplotlib), matplotlib


def test_installed_wheel_runs_outside_the_checkout(installed):
    _, venv, tmp = installed
    work = tmp / "elsewhere"
    work.mkdir()
    python, srupp = str(venv / "bin" / "python"), str(venv / "bin" / "srupp")
    where = run(
        venv, [python, "-c", "import srupp, srupp.ops; print(srupp.__file__, srupp.ops.cpu_kernel_info())"], work
    ).stdout
    assert str(venv) in where and str(ROOT) not in where.split()[0], where
    assert "'loaded': True" in where, where
    version = run(venv, [srupp, "--version"], work).stdout
    assert version.strip() == "srupp 0.1.0", version
    run(venv, [srupp, "train", "--config", "tiny", "--max_steps", "4", "--eval_every", "2", "--out_dir", "run"], work)
    assert (work / "run" / "config.json").is_file()
    demo_args = ["--time_limit_s", "10", "--out", "demo-run", "--sample-bytes", "40", "--eval_tokens", "4096"]
    demo = run(venv, [srupp, "demo", *demo_args], work).stdout
    assert "trained" in demo and "sample" in demo, demo


def test_install_without_a_compiler_falls_back_with_one_warning(tmp_path):
    wheel = build_wheel(tmp_path, CC="/bin/false")
    assert not any(n.endswith(".so") for n in zipfile.ZipFile(wheel).namelist())
    assert wheel.name == "srupp-0.1.0-py3-none-any.whl"  # nothing platform-specific in it
    venv = install(tmp_path, wheel)
    script = (
        "import warnings, torch\n"
        "from srupp.ops import sru_recurrence, sru_recurrence_naive, cpu_kernel_info\n"
        "u, x, v, b = torch.randn(5, 2, 12), torch.randn(5, 2, 4), torch.rand(2, 4), torch.zeros(2, 4)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    h, c = sru_recurrence(u, x, v, b)\n"
        "    sru_recurrence(u, x, v, b)\n"
        "assert torch.equal(h, sru_recurrence_naive(u, x, v, b, torch.zeros(2, 4))[0])\n"
        "assert not cpu_kernel_info()['loaded'], cpu_kernel_info()\n"
        "print(len(caught)); print(caught[0].message)\n"
    )
    out = run(venv, [str(venv / "bin" / "python"), "-c", script], tmp_path).stdout.splitlines()
    assert out[0] == "1", out
    assert "'cpu' backend is unavailable" in out[1] and "C compiler" in out[1] and "falling back" in out[1], out
