"""Installed like any package: a wheel in a clean virtualenv runs a budgeted search from the tables
it carries, and writes nothing into site-packages or the source tree."""
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def files(root: Path) -> dict:
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def git_status() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True
    ).stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A virtualenv with only the wheel installed in it; its dependencies are this environment's,
    reached through a path file (so nothing is downloaded), never this checkout."""
    tmp = tmp_path_factory.mktemp("install")
    # built from a copy of the tracked files: setuptools writes build/ and *.egg-info beside its source
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        src, dst = ROOT / name.decode(), tmp / "src" / name.decode()
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp / "wheel"),
            str(tmp / "src"),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next((tmp / "wheel").glob("amoeba_export-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(tmp / "venv")], check=True)
    bin_ = tmp / "venv" / "bin"
    site = Path(
        subprocess.run(
            [str(bin_ / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    subprocess.run([str(bin_ / "pip"), "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True)
    (site / "_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # after: pip must not see them
    return tmp, site, wheel


def test_wheel_carries_the_shipped_tables(installed):
    import zipfile

    _, _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("amoeba_export/latency_tables/host/pytorch/") and n.endswith(".json") for n in names)
    assert any(n.startswith("amoeba_export/strategies/") and n.endswith("strategy.safetensors") for n in names)


@pytest.mark.slow
def test_budgeted_dry_run_from_the_wheel(installed):
    tmp, site, _ = installed
    work = tmp / "elsewhere"
    work.mkdir(exist_ok=True)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "AMOEBA_EXPORT_DATA": str(tmp / "data")}
    before_site, before_git = files(site), git_status()
    amoeba = str(tmp / "venv" / "bin" / "amoeba-export")
    p = subprocess.run(
        [amoeba, "--target", "host", "--flow", "pytorch", "--budget", "40ms", "--dry-run", "--no-feedback"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr
    assert "Pareto front" in p.stdout and "dry run: nothing written" in p.stdout
    assert f"latency table {site}/amoeba_export/latency_tables/host/pytorch/" in p.stderr  # the wheel's own table
    # a device target with no shipped table: the estimated table goes to the user's data folder
    p = subprocess.run([amoeba, "--target", "jetson-orin", "--flow", "mlc", "--budget", "40ms", "--dry-run"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "ESTIMATED" in p.stdout + p.stderr and list(
        (tmp / "data" / "latency_tables" / "jetson-orin").rglob("*.json")
    )
    assert files(site) == before_site, "the run wrote into site-packages"
    assert git_status() == before_git, "the run wrote into the source tree"
    assert list(work.iterdir()) == []
