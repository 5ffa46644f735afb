"""The search stands on its own: imports go one way (compress <- spaces, evaluators <- search <- results),
a real search runs where paretoken.results cannot be imported, and the hypervolume it prints is the
one `paretoken front` prints for the same study."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from paretoken.cli import main
from paretoken.evaluators.evaluate import EvalConfig
from paretoken.search import run_search

ROOT = Path(__file__).resolve().parents[1]
#: Each package of paretoken and its layer: a module may import its own layer's and lower ones only.
LAYERS = {"compress": 0, "spaces": 1, "evaluators": 1, "search": 2, "results": 3}
SMALL = dict(space="evit", n_trials=4, eval_config=EvalConfig(images=16, batch_size=16, speed=False, flops_images=2))


def _imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import statement of the file, function-level ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.lineno, node.module)]
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def test_no_package_imports_a_higher_layer():
    """search/cli.py is left out: it is the command line's, which stands above results."""
    wrong = []
    for package, layer in LAYERS.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            if package == "search" and path.name == "cli.py":
                continue
            for line, module in _imported(path):
                parts = module.split(".")
                if parts[0] == "paretoken" and len(parts) > 1 and LAYERS.get(parts[1], -1) > layer:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_a_search_runs_where_paretoken_results_cannot_be_imported(tmp_path):
    script = textwrap.dedent(f"""
        import importlib.abc, sys

        class NoResults(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "paretoken.results" or name.startswith("paretoken.results."):
                    raise ImportError(name + " imported during a search")
                return None

        sys.meta_path.insert(0, NoResults())
        from paretoken.evaluators.evaluate import EvalConfig
        from paretoken.search import run_search

        result = run_search("alone", storage={f"sqlite:///{tmp_path / 'alone.db'}"!r}, space="evit", n_trials=4,
                            eval_config=EvalConfig(images=16, batch_size=16, speed=False, flops_images=2))
        assert "paretoken.results" not in sys.modules
        print("ran", result.ran, "complete", result.counts.complete)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "ran 4 complete 4" in proc.stdout
    assert "presets dominated by a searched plan:" in proc.stdout  # the report's line that once needed results
    assert "Pareto front:" in proc.stdout


def test_the_search_and_front_print_the_same_hypervolume(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'hv.db'}"
    lines: list[str] = []
    result = run_search("hv", storage=storage, seed=3, log=lines.append, **SMALL)
    done = next(line for line in lines if line.startswith("done: "))
    printed = float(re.search(r"hypervolume (\S+) \(reference", done).group(1))
    assert result.hypervolume > 0 and printed == pytest.approx(result.hypervolume, rel=1e-3)

    assert main(["front", "--study", "hv", "--storage", storage, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["hypervolume"] == pytest.approx(result.hypervolume, rel=1e-12)
    assert shown["reference"] == pytest.approx(result.reference)
    assert main(["front", "--study", "hv", "--storage", storage]) == 0
    text = capsys.readouterr().out
    assert float(re.search(r"hypervolume (\S+) \(reference", text).group(1)) == pytest.approx(printed, rel=1e-3)
    assert {row["number"] for row in shown["front"]} == set(result.front["trial"])
