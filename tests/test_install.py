"""`pip install .` and `pip install -e .` both give a working `paretoken` with every subpackage; its
public names load on first use."""
from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ["cli", "compress", "spaces", "evaluators", "search", "results"]
#: Where each package lives in the checkout (pyproject's package-dir).
FOLDERS = {"paretoken": "paretoken", "cli": "paretoken/cli"}
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
            expected = REPO / FOLDERS.get(name, name) / "__init__.py"
            assert Path(path) == expected, (name, path)
        else:
            assert path.startswith(site), (name, path)
    assert "default_fmnist.safetensors" in found["weights"]
    script = subprocess.run([str(env_dir / "bin" / "paretoken"), "presets"], capture_output=True, text=True)
    assert script.returncode == 0 and "tome-r13" in script.stdout


def test_public_names_resolve_and_importing_paretoken_needs_no_torch():
    names = ["Budgets", "EvalConfig", "PRESETS", "ParetokenError", "Plan", "Stage", "apply", "compile_model", "count_flops", "evaluate",
             "load_plan", "preset", "run_search", "token_counts"]
    probe = ("import json, sys, paretoken; print(json.dumps({'torch': 'torch' in sys.modules, "
             "'all': paretoken.__all__, 'dir': dir(paretoken)}))")
    found = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert not found["torch"]
    assert sorted(found["all"]) == names and set(names) <= set(found["dir"])

    import paretoken
    from paretoken.compress.patch import apply
    from paretoken.compress.presets import PRESETS
    from paretoken.evaluators.evaluate import EvalConfig, evaluate
    from paretoken.evaluators.metrics import Budgets
    from paretoken.search import run_search

    assert paretoken.EvalConfig is EvalConfig and paretoken.evaluate is evaluate and paretoken.Budgets is Budgets
    assert paretoken.run_search is run_search and paretoken.apply is apply and paretoken.PRESETS is PRESETS
    assert all(getattr(paretoken, name) is not None for name in names)
    with pytest.raises(AttributeError, match="no attribute 'search_cli'"):
        paretoken.search_cli
