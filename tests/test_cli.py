"""The command line: help everywhere, and every bad input as one line, exit 2, no traceback."""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import re
import shutil
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

#: Flags several subcommands share: one definition each (paretoken.cli.flags), so one help text.
SHARED_FLAGS = ("--model", "--checkpoint", "--pretrained", "--data", "--device", "--study", "--storage",
                "--objectives", "--max-gflops", "--min-top1", "--max-top1-drop", "--json")


def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "paretoken.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_console_script_and_help_on_every_subcommand():
    exe = shutil.which("paretoken")
    assert exe, "the console script `paretoken` is not installed"
    top = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert top.returncode == 0
    commands = ["presets", "flops", "eval", "slim", "search", "spaces", "front", "export", "finetune"]
    for name in commands:
        assert name in top.stdout
        sub = run(name, "--help")
        assert sub.returncode == 0 and "usage: paretoken " + name in sub.stdout


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions for flag in action.option_strings}


def test_shared_flags_have_one_help_text_and_the_device_defaults_to_auto():
    from paretoken.cli import subcommands
    from paretoken.cli.flags import MODEL_HELP

    helps: dict[str, set[str]] = {flag: set() for flag in SHARED_FLAGS}
    with_model, devices = [], {}
    for name, parser in subcommands().items():
        options = _options(parser)
        for flag in SHARED_FLAGS:
            if flag in options:  # the default, in brackets at the end, aside: finetune's come from the plan
                text = re.sub(r" \[[^]]*\]$", "", options[flag].help)
                helps[flag].add(text.removesuffix(" (repeat to compare studies)"))
        if "--model" in options:
            with_model.append(name)
            assert all(f in options for f in ("--checkpoint", "--pretrained", "--data", "--device")), name
        if "--device" in options:
            devices[name] = options["--device"].default
    assert {flag: len(texts) for flag, texts in helps.items()} == dict.fromkeys(SHARED_FLAGS, 1), helps
    assert helps["--model"] == {MODEL_HELP["model"]} and helps["--data"] == {MODEL_HELP["data"]}
    assert with_model == ["flops", "eval", "slim", "search", "finetune"]
    assert devices == dict.fromkeys(["flops", "eval", "slim", "search", "holdout", "finetune"], "auto")


def test_help_needs_no_torch_and_the_command_line_lives_in_one_package():
    code = ("import contextlib, io, sys\nfrom paretoken.cli import main, subcommands\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    for args in [['--help'], *([name, '--help'] for name in subcommands())]:\n"
            "        try:\n            main(args)\n        except SystemExit:\n            pass\n"
            "print(sorted(m for m in ('torch', 'timm', 'optuna', 'pandas', 'ray') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    assert importlib.util.find_spec("paretoken.search.cli") is None
    assert importlib.util.find_spec("paretoken.results.cli") is None


def test_presets_lists_every_schedule_with_its_source():
    out = run("presets").stdout
    for name in ["tome-r8", "tome-r13", "tome-r16", "evit-0.7", "evit-0.5", "dynamicvit-0.7", "asvit", "jmp",
                 "slim"]:
        assert name in out
    assert "Bolya" in out and "Liang" in out and "Rao" in out


def test_flops_prints_gflops_and_token_counts():
    out = run("flops", "--model", "deit_small_patch16_224", "--preset", "tome-r13", "--images", "1")
    assert out.returncode == 0, out.stderr
    assert "GFLOPs  2.71" in out.stdout
    assert "block 11:    41.0" in out.stdout


def test_prefix_only_last_flag_adds_to_a_preset(capsys):
    from paretoken.cli import main

    def flops(*extra: str) -> dict:
        assert main(["flops", "--preset", "evit-0.7", "--images", "1", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    plain, short = flops(), flops("--prefix-only-last")
    assert short["gflops"] < plain["gflops"] and short["plan"] == {**plain["plan"], "prefix_only_last": True}
    assert short["tokens_per_block"][:-1] == plain["tokens_per_block"][:-1] and short["tokens_per_block"][-1] == 1


def _write_plan_files(folder) -> None:
    (folder / "malformed.yaml").write_text("version: 1\nstages: [ {layer: 3, op: prune\n")
    (folder / "unknown_op.yaml").write_text("version: 1\nstages:\n  - {layer: 3, op: prun, keep: 0.7}\n")
    (folder / "out_of_range.yaml").write_text("version: 1\nstages:\n  - {layer: 12, op: prune, keep: 0.7}\n")
    (folder / "bad_keep.json").write_text('{"version": 1, "stages": [{"layer": 1, "op": "merge", "keep": 2}]}')
    (folder / "binary.yaml").write_bytes(bytes(range(128, 256)) * 3)
    (folder / "deep.yaml").write_text("[" * 5000)
    (folder / "bytes.yaml").write_text("version: 1\nmeta: {b: !!binary aGVsbG8=}\nstages: []\n")
    bomb = "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}' if i else 'x'] * 10)}]\n" for i in range(9))
    (folder / "aliases.yaml").write_text(bomb + "version: 1\nstages:\n  - {layer: 3, op: *a8, keep: 0.7}\n")
    (folder / "notes.txt").write_text("not a journal\n")
    (folder / "empty.yaml").write_text("# nothing\n")
    (folder / "nan_keep.yaml").write_text("version: 1\nstages:\n  - {layer: 3, op: prune, keep: .nan}\n")


def _bad_inputs(tmp_path):
    """The cases that run as processes (the console entry point end to end)."""
    _write_plan_files(tmp_path)
    foreign = tmp_path / "foreign.db"
    with contextlib.closing(sqlite3.connect(foreign)) as db, db:
        db.execute("CREATE TABLE notes (text TEXT)")
    search = ["search", "--study", "bad", "--storage", f"sqlite:///{tmp_path}/bad.db"]
    return [
        (["flops", "--plan", str(tmp_path / "malformed.yaml")], "is not valid YAML/JSON"),
        (["eval", "--checkpoint", str(tmp_path / "missing.safetensors")], "missing.safetensors"),
        (["eval", "--seed", "-1"], "argument --seed: '-1' is out of range; valid: an integer in 0..4294967295"),
        (["search", "--study", "bad", "--storage", f"sqlite:///{tmp_path}/bad.db", "--checkpoint",
          str(tmp_path / "missing.pth")], "checkpoint: "),
        (["search", "--study", "bad", "--storage", f"sqlite:///{tmp_path}/bad.db", "--data",
          str(tmp_path / "no-such-dir")], "data: "),
        ([*search, "--model", "efficientnet_b0"], "is not a timm VisionTransformer"),
        (["search", "--study", "bad", "--storage", f"sqlite:///{foreign}", "--trials", "1"],
         "is another program's SQLite database (no Optuna tables)"),
        (["front", "--study", "bad", "--storage", f"sqlite:///{foreign}"], "is another program's SQLite database"),
    ]


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def test_bad_input_is_one_line_exit_2_no_traceback(tmp_path):
    cases = _bad_inputs(tmp_path)
    with ThreadPoolExecutor(4) as pool:  # independent processes, mostly Python start-up: run them together
        outs = list(pool.map(lambda case: run(*case[0]), cases))
    for (args, needle), out in zip(cases, outs):
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2, (args, out.stderr)
        assert len(lines) == 1 and lines[0].startswith(f"paretoken {args[0]}: error: argument " if "argument --"
                                                       in needle else "paretoken: error: "), (args, out.stderr)
        assert needle in lines[0], (args, lines[0])
        assert "Traceback" not in out.stderr + out.stdout
    assert not (tmp_path / "bad.db").exists()  # the searches stopped before opening their study
    with contextlib.closing(sqlite3.connect(tmp_path / "foreign.db")) as db:  # Optuna added no tables to it
        assert [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["notes"]


@pytest.mark.parametrize("args, message", [
    (["flops", "--plan", "unknown_op.yaml"], "op 'prun' is unknown; valid: prune, prune_fuse"),
    (["flops", "--plan", "out_of_range.yaml"], "layer 12 is out of range; valid: 0..11"),
    (["eval", "--plan", "bad_keep.json"], "keep 2 is out of range; valid: 0 < keep <= 1"),
    (["flops", "--plan", "missing.yaml"], "does not exist"),
    (["flops", "--preset", "tome-r99"], "preset: 'tome-r99' is unknown; valid:"),
    (["eval", "--model", "deit_smal_patch16_224"], "deit_smal_patch16_224"),
    (["eval", "--data", "no-such-dir"], "no-such-dir"),
    (["eval", "--skip", "10000"], "skip: 10000 is invalid; valid: an integer in 0..9999 (10000 images available in"),
    (["eval", "--skip", "9990", "--images", "20"], "images: 20 is invalid; valid: an integer in 1..10 (10 images available in"),
    (["eval", "--device", "cuda:7"] if not _has_cuda() else ["eval", "--device", "tpu"], "device:"),
    (["flops", "--plan", "binary.yaml"], "plan: 'binary.yaml' is not UTF-8 text; valid: a YAML or JSON plan file"),
    (["flops", "--plan", "deep.yaml"], "plan: 'deep.yaml' nests too deeply"),
    (["flops", "--plan", "."], "plan: '.' is not a regular file"),
    (["flops", "--device", "bogus"], "device: 'bogus' is unknown; valid: cpu, cuda, cuda:N or auto"),
    (["eval", "--device", "meta"], "device: 'meta' is unknown"),
    (["slim", "--layers", "3,3"], "layers: 3,3 names a block twice"),
    (["search", "--study", "s", "--ray-address", "auto"], "ray-address: 'auto' needs --backend ray"),
    (["eval", "--batch-size", "0"], "argument --batch-size: '0' is out of range; valid: an integer >= 1"),
    (["eval", "--images", "ten"], "argument --images: 'ten' is not an integer; valid: an integer >= 1"),
    (["slim", "--tolerance", "nan"], "argument --tolerance: 'nan' is out of range; valid: a finite number > 0"),
    (["search", "--study", "s", "--seed", str(2**32)], "argument --seed: '4294967296' is out of range; "
                                                       "valid: an integer in 0..4294967295"),
    (["search", "--study", "s", "--max-gflops", "inf"], "argument --max-gflops: 'inf' is out of range; "
                                                        "valid: a finite number"),
    (["search", "--study", "s", "--heartbeat", "9999999999"], "argument --heartbeat: '9999999999' is out of range; "
                                                              "valid: an integer in 1..86400"),
    (["search", "--study", "s", "--cpus-per-trial", "0"], "argument --cpus-per-trial: '0' is out of range; "
                                                          "valid: a finite number > 0"),
    (["search", "--study", "s", "--plot", "front.bogus"], "plot: 'front.bogus' has suffix '.bogus'"),
    (["front", "--study", "s", "--max-gflops", "-1"], "max-gflops: -1.0 is invalid; valid: a finite number > 0"),
    (["front", "--study", "s", "--plot", "f.png", "--history", "h.bogus"], "history: 'h.bogus' has suffix"),
    (["front", "--study", "s", "--storage", "journal:s.csv", "--csv", "s.csv"], "csv: 's.csv' is the study's storage"),
    (["front", "--study", "a", "--study", "b", "--plot", "f.png"], "plot: --plot and --history draw one study"),
    (["export", "--study", "s", "--trial", "1", "--out", "s.db"], "out: 's.db' has suffix '.db'; valid: a file "
                                                                  "ending in .yaml, .yml, .json"),
    (["export", "--study", "s", "--trial", "1", "--out", "binary.yaml/p.yaml"], "out: cannot write 'binary.yaml/p.yaml': 'binary.yaml' is a file"),
    (["slim", "--out", "slim.txt"], "out: 'slim.txt' has suffix '.txt'"),
    (["flops", "--plan", "bytes.yaml"], "plan: meta must hold JSON values"),
    (["search", "--study", "s", "--storage", "sqlite://studies/s.db"], "storage: 'sqlite://studies/s.db' is not a "
                                                                      "storage URL; valid: sqlite:///FILE.db"),
    (["front", "--study", "s", "--storage", "sqlite+pysqlite:///none.db"], "storage: 'none.db' does not exist"),
    (["front", "--study", "s", "--plot", "f.png", "--history", "./f.png"], "history: './f.png' is the --plot file"),
    (["flops", "--plan", "empty.yaml"], "plan: 'empty.yaml' is empty; valid: a YAML or JSON plan file"),
    (["flops", "--plan", "nan_keep.yaml"], "stage 0: keep nan is not a finite number; valid: 0 < keep <= 1"),
    (["slim", "--layers", "10-12"], "layers: 10,11,12 is out of range; valid: block indices in 0..11"),
    (["flops", "--plan", "aliases.yaml"], "holds more than 100,000 values once its YAML aliases are expanded"),
    (["search", "--study", "s", "--storage", "journal:notes.txt"], "storage: 'notes.txt' is not an Optuna journal"),
    (["search", "--study", "s", "--storage", "sqlite://"], "storage: 'sqlite://' is an in-memory database"),
    (["search", "--study", "s", "--gpus-per-trial", "1"], "gpus-per-trial: 1 is for Ray trials"),
    (["search", "--study", "s", "--gpus-per-trial", "0"], "gpus-per-trial: 0 is for Ray trials; the local backend "
                                                          "runs in process on --device; valid: --backend ray, or "
                                                          "no --gpus-per-trial"),
    (["search", "--study", "s", "--cpus-per-trial", "2"], "cpus-per-trial: 2 is for Ray trials"),
    (["search", "--study", "s", "--backend", "ray", "--ray-address", ""], "ray-address: '' names no cluster"),
    (["holdout", "--study", "s", "--images", "0"], "argument --images: '0' is out of range"),
    (["search", "--study", "s", "--min-images", "64", "--images", "32"], "min-images: 64 is invalid; valid: an "
                                                                         "integer in 1..32 (at most --images 32)"),
    (["search", "--study", "s", "--min-images", "0"], "argument --min-images: '0' is out of range"),
    (["search", "--study", "s", "--min-images", "8", "--eta", "1"], "argument --eta: '1' is out of range; "
                                                                    "valid: an integer >= 2"),
    (["search", "--study", "s", "--eta", "3"], "eta: 3 applies to successive halving only; valid: --min-images M"),
    (["search", "--study", "s", "--promotion", "top"], "promotion: 'top' applies to successive halving only"),
    (["search", "--study", "s", "--min-images", "8", "--promotion", "all"], "argument --promotion: invalid choice"),
    (["search", "--study", "s", "--min-images", "8", "--objectives", "top1,speedup"],
     "min-images: successive halving ranks plans below the full rung, where speedup is not timed"),
])
def test_bad_input_in_process_is_one_line_before_any_work(args, message, tmp_path, monkeypatch, capsys):
    from paretoken.cli import main

    monkeypatch.chdir(tmp_path)
    _write_plan_files(tmp_path)
    written = sorted(tmp_path.iterdir())
    try:
        code = main(args)
    except SystemExit as stop:  # argparse
        code = stop.code
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], lines
    assert lines[0].startswith(("paretoken: error: ", f"paretoken {args[0]}: error: "))
    assert sorted(tmp_path.iterdir()) == written  # no study, no plot


def test_plan_flag_given_a_preset_name_points_to_preset(tmp_path, monkeypatch, capsys):
    from paretoken.cli import main

    monkeypatch.chdir(tmp_path)  # no file named like the preset here
    assert main(["flops", "--plan", "tome-r13"]) == 2
    assert capsys.readouterr().err.strip() == ("paretoken: error: plan: file 'tome-r13' does not exist; "
                                               "for the published schedule pass --preset tome-r13")


def test_output_that_cannot_be_written_or_is_cut_short():
    proc = subprocess.Popen([sys.executable, "-m", "paretoken.cli", "spaces", "--presets"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # a reader gone before the output came, as `| head -1` is after its line
    assert proc.wait(timeout=60) == 1 and proc.stderr.read() == ""
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "paretoken.cli", "spaces", "--presets"], stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    assert done.returncode == 2 and done.stderr == "paretoken: error: No space left on device\n"
