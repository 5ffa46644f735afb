"""The flags several subcommands share, each defined once: one name, one help text, one default.

A flag whose meaning differs between commands (``--images``: evaluation, calibration or held-out
images; ``--seed``; ``--out``) stays with its command. Cheap to import (no torch).
"""
from __future__ import annotations

import argparse

from paretoken import argtypes
from paretoken.evaluators.metrics import OBJECTIVES_HELP, Budgets
from paretoken.outputs import PLOT_SUFFIXES

DEFAULT_DEVICE = "auto"
DEFAULT_OBJECTIVES = "top1,gflops"

#: Help of the model flags without their default, which :func:`add_model_flags` appends in brackets.
MODEL_HELP = {
    "model": "timm model name, or 'default' (the embedded Fashion-MNIST ViT)",
    "checkpoint": "weights: .safetensors or .pth (plain or timm-wrapped)",
    "pretrained": "load the model's weights from the local Hugging Face cache (never the network)",
    "data": "Fashion-MNIST idx.gz dir or an ImageNet-style folder",
}
#: The bracketed defaults of the model flags: their own, or (``finetune``) an exported plan's meta first.
MODEL_DEFAULTS = {
    "own": {"model": "default", "checkpoint": "the packaged weights for 'default', else timm's initialisation",
            "data": "/usr/share/datasets/fashion-mnist"},
    "plan": {"model": "the plan's meta, else default",
             "checkpoint": ("the plan's meta (for the plan's own model), else the packaged weights "
                            "for 'default', else timm's initialisation"),
             "pretrained": "the plan's meta where no --checkpoint is given",
             "data": "the plan's meta, else /usr/share/datasets/fashion-mnist"},
}
FLOPS_HELP = ("how GFLOPs are measured: count (from every image's token counts, exact to fvcore's trace) "
              "or trace (fvcore; per-image plans: the mean of the first images, each traced alone) [count]")
DEVICE_HELP = "cpu, cuda, cuda:N or auto (cuda where present, else cpu) [auto]"
STORAGE_HELP = ("Optuna storage: sqlite:///FILE.db, journal:FILE (several processes on one host) or "
                "postgresql://USER@HOST/DB [sqlite:///studies/NAME.db]")
OBJECTIVES_FLAG_HELP = f"objectives, comma-separated: {OBJECTIVES_HELP} [{DEFAULT_OBJECTIVES}]"
BATCH_SIZE_HELP = "images per forward, and per timed batch where speed is measured [100]"
JSON_HELP = "machine-readable output on stdout"
PLOT_FORMATS = f"FILE{'/'.join(s for s in PLOT_SUFFIXES if s != '.html')} (matplotlib) or FILE.html (plotly)"
BUDGET_HELP = {
    "max_gflops": "budget: at most X GFLOPs per image",
    "min_top1": "budget: top-1 of at least Y %%",
    "max_top1_drop": "budget: top-1 at most D points below the uncompressed model's (same images)",
}


def add_model_flags(parser, *, defaults: str = "own") -> None:
    """``--model --checkpoint --pretrained --data --device`` on ``parser`` (or an argument group).
    ``defaults="plan"``: the first four default to None, for a command that reads an exported plan's meta."""
    shown = MODEL_DEFAULTS[defaults]

    def helped(flag: str) -> str:
        return MODEL_HELP[flag] + (f" [{shown[flag]}]" if flag in shown else "")

    parser.add_argument("--model", default="default" if defaults == "own" else None, help=helped("model"))
    parser.add_argument("--checkpoint", metavar="FILE", help=helped("checkpoint"))
    parser.add_argument("--pretrained", action="store_true", help=helped("pretrained"))
    parser.add_argument("--data", metavar="DIR", help=helped("data"))
    add_device_flag(parser)


def add_flops_flag(parser) -> None:
    parser.add_argument("--flops", default="count", choices=("count", "trace"), help=FLOPS_HELP)


COMPILE_HELP = ("run the plan and the uncompressed model it is timed against under torch.compile (one graph "
                "for plans without per-image stages); compilation is timed apart (compile_s)")


def add_compile_flag(parser) -> None:
    parser.add_argument("--compile", action="store_true", help=COMPILE_HELP)


def add_device_flag(parser) -> None:
    parser.add_argument("--device", default=DEFAULT_DEVICE, help=DEVICE_HELP)


def add_study_flags(parser, *, several: bool = False) -> None:
    """``--study NAME`` (required; ``several``: repeatable, a list) and ``--storage URL``."""
    parser.add_argument("--study", required=True, metavar="NAME", action="append" if several else "store",
                        help="study name" + (" (repeat to compare studies)" if several else ""))
    parser.add_argument("--storage", metavar="URL", help=STORAGE_HELP)


def add_objectives_flag(parser) -> None:
    parser.add_argument("--objectives", default=DEFAULT_OBJECTIVES, metavar="A,B", help=OBJECTIVES_FLAG_HELP)


def add_budget_flags(parser: argparse.ArgumentParser, description: str) -> None:
    """``--max-gflops --min-top1 --max-top1-drop`` in a group whose ``description`` says what a budget
    does in this command; read back with :func:`budgets`."""
    group = parser.add_argument_group("budgets", description)
    group.add_argument("--max-gflops", type=argtypes.finite, metavar="X", help=BUDGET_HELP["max_gflops"])
    group.add_argument("--min-top1", type=argtypes.finite, metavar="Y", help=BUDGET_HELP["min_top1"])
    group.add_argument("--max-top1-drop", type=argtypes.finite, metavar="D", help=BUDGET_HELP["max_top1_drop"])


def budgets(args: argparse.Namespace) -> Budgets:
    """The budget flags' :class:`Budgets`, checked (a bad one is a :class:`ParetokenError`)."""
    return Budgets(args.max_gflops, args.min_top1, args.max_top1_drop).check()


def add_batch_size_flag(parser) -> None:
    parser.add_argument("--batch-size", type=argtypes.positive_int, default=100, help=BATCH_SIZE_HELP)


def add_json_flag(parser) -> None:
    parser.add_argument("--json", action="store_true", help=JSON_HELP)


def add_plot_flag(parser, what: str = "the front", flag: str = "--plot") -> None:
    """``--plot FILE`` (or ``flag``): draw ``what`` to a file whose suffix picks the library."""
    parser.add_argument(flag, metavar="FILE", help=f"draw {what}: {PLOT_FORMATS}")
