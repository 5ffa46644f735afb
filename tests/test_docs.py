"""The documentation stays true: docs/cli.md is the command's own --help, the README is short and
undated, every relative link leads to a file, and the README's Python quickstart runs as written."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import paretoken

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _cli_docs():
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli_docs = _cli_docs()
HELPS = cli_docs.help_texts()


def _without_code(text: str) -> str:
    return re.sub(r"^```.*?^```$", "", text, flags=re.M | re.S)


def test_every_subcommand_is_documented_with_its_help():
    sections = cli_docs.sections((ROOT / "docs" / "cli.md").read_text(encoding="utf-8"))
    commands = [name for name in HELPS if name != "paretoken"]
    assert len(commands) >= 10  # presets, flops, eval, slim, search, spaces, front, holdout, export, finetune
    for name, text in HELPS.items():
        assert name in sections, f"docs/cli.md has no section '## {name}' with a ```text block"
        assert sections[name][2] == text, (f"docs/cli.md's '## {name}' differs from `{name} --help`; "
                                           "run: python scripts/cli_docs.py")
    assert set(sections) <= set(HELPS), f"sections of no command: {sorted(set(sections) - set(HELPS))}"


def test_help_is_rendered_at_the_fixed_width_whatever_the_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    narrow_terminal = cli_docs.help_texts()
    assert narrow_terminal == HELPS
    assert max(len(line) for text in HELPS.values() for line in text.splitlines()) <= cli_docs.WIDTH
    assert any(len(line) > 80 for line in HELPS["paretoken search"].splitlines())  # really 100 wide, not 80


def test_rewrite_replaces_only_the_help_blocks_and_adds_missing_sections():
    helps = {"paretoken": "usage: paretoken\n", "paretoken eval": "usage: paretoken eval NEW\n",
             "paretoken front": "usage: paretoken front\n"}
    text = ("# CLI\n\nIntro.\n\n## paretoken\n\n```text\nusage: paretoken\n```\n\n"
            "## paretoken eval\n\nMeasure a plan.\n\n    paretoken eval --preset evit-0.7\n\n"
            "```text\nusage: paretoken eval OLD\n```\n\nAfter the block.\n")
    assert cli_docs.stale(text, helps) == ["paretoken eval", "paretoken front"]
    new = cli_docs.rewrite(text, helps, {"paretoken front": "the Pareto front"})
    assert "usage: paretoken eval NEW\n```" in new and "OLD" not in new
    for prose in ("Intro.", "Measure a plan.", "    paretoken eval --preset evit-0.7", "After the block."):
        assert prose in new
    assert new.endswith("## paretoken front\n\nthe Pareto front.\n\n```text\nusage: paretoken front\n```\n")
    assert cli_docs.stale(new, helps) == []
    assert cli_docs.rewrite(new, helps) == new


def test_readme_is_short_and_holds_no_dates_or_commit_hashes():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    dates = re.findall(r"\b\d{4}-\d{2}-\d{2}\b", text)
    hashes = re.findall(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b", text)
    assert not dates and not hashes, (dates, hashes)


def _anchors(doc: Path) -> set[str]:
    """The anchors GitHub gives ``doc``'s headings: lower case, punctuation but ``-`` and ``_`` dropped,
    spaces as ``-``."""
    heads = re.findall(r"^#+ (.+)$", _without_code(doc.read_text(encoding="utf-8")), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", head.strip().lower()).replace(" ", "-") for head in heads}


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_lead_to_files_and_headings(doc):
    links = re.findall(r"\]\(([^)\s]+)\)", _without_code(doc.read_text(encoding="utf-8")))
    relative = [link for link in links if not re.match(r"[a-z]+:", link)]
    missing = [link for link in relative if link.split("#")[0] and not (doc.parent / link.split("#")[0]).exists()]
    assert not missing, f"{doc.name} links to missing files: {missing}"
    anchored = [link for link in relative if "#" in link]
    unknown = [link for link in anchored
               if link.split("#")[1] not in _anchors(doc.parent / link.split("#")[0] if link.split("#")[0] else doc)]
    assert not unknown, f"{doc.name} links to headings that do not exist: {unknown}"


def test_the_docs_named_in_issue_29_exist():
    names = {p.name for p in DOCS}
    assert {"cli.md", "plans.md", "search.md", "finetune.md", "default-model.md", "benchmarks.md",
            "design.md"} <= names


def _readme_python() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```$", README.read_text(encoding="utf-8"), flags=re.M | re.S)
    assert len(blocks) == 1, "the README has one Python quickstart block"
    return blocks[0]


@pytest.mark.skipif(not hasattr(paretoken, "run_search"),
                    reason="paretoken does not export run_search yet (issue 29, item 6)")
def test_readme_python_quickstart_runs_as_written(tmp_path):
    done = subprocess.run([sys.executable, "-c", _readme_python()], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "studies").is_dir()  # the search wrote its study where it was run
