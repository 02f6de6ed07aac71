"""What `pip install .` gives: a wheel built from the repository carries the bundled default model, and an
installation of it finds that model without the repository."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dgaetok.models import file_sha256

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_a_wheel_installs_with_its_default_model(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("dgaetok", "weights"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp_path / "dist")],
                   check=True, cwd=tmp_path, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("dgaetok-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    assert {"dgaetok/weights/default.safetensors", "dgaetok/weights/default-1step.safetensors",
            "dgaetok/weights/README.md"} <= packed

    # installed on its own (the other packages from this environment), away from the repository
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DGAETOK_WEIGHTS")}
    probe = ("import json, dgaetok, dgaetok.models as m; model = m.load_model(); "
             "print(json.dumps({'package': dgaetok.__file__, 'default': str(m.resolve_model()), "
             "'hash': model.file_hash}))")
    proc = subprocess.run([sys.executable, "-c", probe], env={**env, "PYTHONPATH": str(site)}, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert Path(found["package"]).is_relative_to(site)
    assert Path(found["default"]) == site / "dgaetok" / "weights" / "default.safetensors"
    assert found["hash"] == file_sha256(REPO / "weights" / "default.safetensors")
