"""The build script of a flow whose toolchain lives on the device (TensorRT-LLM, MLC-LLM).

Both exporters write `build.sh` beside the artifact and, where the tool is on PATH (on the device),
run it; elsewhere the build record says where to run it. One place for the three steps.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SCRIPT = "build.sh"


def write_script(out_dir: Path, text: str) -> list[str]:
    """Write `build.sh` (executable) into `out_dir`; returns [its name]."""
    path = Path(out_dir) / SCRIPT
    path.write_text(text)
    path.chmod(0o755)
    return [SCRIPT]


def skipped(tool: str, target: dict) -> dict | None:
    """The build record when `tool` is not on PATH here, else None (the script can run)."""
    if shutil.which(tool) is not None:
        return None
    return {"built": [], "script": SCRIPT,
            "skipped": f"{tool} is not on PATH here: run `bash {SCRIPT}` on the {target.get('name', 'device')}"}


def run_script(out_dir: Path) -> tuple[int, list[str]]:
    """Run `bash build.sh` in `out_dir`: (return code, its output lines, stdout then stderr)."""
    proc = subprocess.run(["bash", SCRIPT], cwd=out_dir, capture_output=True, text=True, check=False)
    return proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()
