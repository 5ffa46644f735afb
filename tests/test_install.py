"""`pip install .` and `pip install -e .` both give a working `paretoken` with every subpackage."""
from __future__ import annotations

import json
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["compress", "spaces", "evaluators", "search", "results"]
PROBE = (
    "import json, paretoken, importlib, importlib.resources as r;"
    f"mods = {{n: importlib.import_module('paretoken.' + n).__file__ for n in {SUBPACKAGES!r}}};"
    "mods['paretoken'] = paretoken.__file__;"
    "w = r.files('paretoken.evaluators') / 'weights';"
    "print(json.dumps({'files': mods, 'weights': sorted(p.name for p in w.iterdir()) if w.is_dir() else []}))"
)


@pytest.mark.parametrize("editable", [False, True], ids=["install", "editable"])
def test_pip_install(tmp_path, editable):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    cmd = [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
           "--disable-pip-version-check"]
    subprocess.run([*cmd, *(["-e"] if editable else []), str(REPO)], check=True, capture_output=True, cwd=tmp_path)
    probe = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, cwd=tmp_path, check=True)
    found = json.loads(probe.stdout)
    site = str(env_dir)
    for name, path in found["files"].items():
        if editable:  # the folders of the checkout are the subpackages
            expected = REPO / ("paretoken" if name == "paretoken" else name) / "__init__.py"
            assert Path(path) == expected, (name, path)
        else:
            assert path.startswith(site), (name, path)
    assert "default_fmnist.safetensors" in found["weights"]
    script = subprocess.run([str(env_dir / "bin" / "paretoken"), "presets"], capture_output=True, text=True)
    assert script.returncode == 0 and "tome-r13" in script.stdout
