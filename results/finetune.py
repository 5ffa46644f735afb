"""Fine-tune a compressed model by distillation from the uncompressed one.

The student is the model with the plan applied (``paretoken.apply``), the teacher the same weights
uncompressed and frozen. Loss per batch::

    (1 - alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

AdamW with a linear warm-up then cosine decay. Training images come from the data's ``calib``
split (the Fashion-MNIST train set, or the ImageFolder images that the ``eval`` split does not
take), so the before/after top-1 on the ``eval`` split is measured on images never trained on.

Learned stages (:mod:`paretoken.compress.learn`) train with the weights:

- ``threshold`` stages learn their thresholds (AS-ViT): a differentiable mask in training, the
  hard rule at inference, and a budget loss ``budget_weight * (mean kept fraction - budget)^2``
  whose budget (the fraction of patch tokens kept, averaged over the threshold stages) defaults
  to what the plan's thresholds keep before fine-tuning; the learned values go into the output plan;
- ``score: predictor`` stages train DynamicViT predictors (Gumbel-softmax decisions, attention
  masking, ratio loss ``budget_weight * (kept fraction - target)^2`` with the stage's keep as
  target); their weights go into the output checkpoint.

The output is a weights file (``.safetensors``) plus the plan written beside it, whose ``meta``
names the new checkpoint, so ``paretoken eval --checkpoint OUT --plan OUT.yaml`` measures it.
"""
from __future__ import annotations

import datetime as _dt
import math
import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F

from paretoken.compress import Plan, Stage, apply, learn, learn_thresholds, learned_plan, load_plan, token_counts
from paretoken.argtypes import MAX_SEED
from paretoken.errors import ParetokenError, check_int
from paretoken.outputs import check_output

_LEARNED_KEY = re.compile(r"\.token_(predictor|threshold)\.")
_BUDGET_WITHOUT_THRESHOLDS = ("finetune: --budget steers learned thresholds; valid only for a plan with threshold "
                              "stages (not only a moot one in the last block of a prefix_only_last plan) and "
                              "without --fixed-thresholds")


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning settings; ``None`` for model/checkpoint/data means the plan's ``meta``, then the defaults."""

    model: str | None = None
    checkpoint: str | None = None
    pretrained: bool = False
    data: str | None = None
    epochs: float = 1.0
    train_images: int | None = None  # None: the whole calib split
    eval_images: int = 1000
    batch_size: int = 128
    lr: float = 5e-5
    weight_decay: float = 0.05
    warmup: float = 0.05  # fraction of the steps
    alpha: float = 0.5
    temperature: float = 1.0
    learn_thresholds: bool = True
    budget: float | None = None  # kept fraction for threshold stages; None: what the plan keeps before
    budget_weight: float = 2.0
    learned_lr: float = 1e-3  # learning rate of predictors and thresholds
    seed: int = 0
    device: str = "cpu"
    max_steps: int | None = None

    def check(self) -> None:
        for name, low in (("epochs", 0.0), ("lr", 0.0), ("temperature", 0.0), ("learned_lr", 0.0)):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > low):
                raise ParetokenError(f"finetune: {name} {value!r} is invalid; valid: a number > {low:g}")
        for name in ("batch_size", "eval_images"):
            if getattr(self, name) < 1:
                raise ParetokenError(f"finetune: {name} {getattr(self, name)!r} is invalid; valid: an integer >= 1")
        for name in ("train_images", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ParetokenError(f"finetune: {name} {value!r} is invalid; valid: an integer >= 1")
        if not 0.0 <= self.alpha <= 1.0:
            raise ParetokenError(f"finetune: alpha {self.alpha!r} is out of range; valid: 0 <= alpha <= 1")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise ParetokenError(f"finetune: budget {self.budget!r} is out of range; valid: 0 < budget <= 1")
        for name in ("budget_weight", "weight_decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0.0):
                raise ParetokenError(f"finetune: {name} {value!r} is invalid; valid: a number >= 0")
        if not 0.0 <= self.warmup <= 1.0:
            raise ParetokenError(f"finetune: warmup {self.warmup!r} is out of range; valid: 0 <= warmup <= 1 "
                                 "(a fraction of the steps)")
        check_int("seed", self.seed, 0, MAX_SEED)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float,
                      temperature: float) -> torch.Tensor:
    """(1 - alpha) CE + alpha T^2 KL(teacher || student), both over the batch mean."""
    ce = F.cross_entropy(student, labels)
    if alpha == 0.0:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True,
                  reduction="batchmean") * (t * t)
    return (1.0 - alpha) * ce + alpha * kl


def learned_stage_loss(kept: list[tuple[Stage, torch.Tensor, torch.Tensor]], patches: int,
                       budget: float | None) -> torch.Tensor | None:
    """Token-count loss of one training forward's learned stages (``TokenState.kept``), or None.

    Predictor stages: DynamicViT's ratio loss towards the stage's keep (of the tokens alive before
    it). Threshold stages: the budget loss on their kept fractions averaged per image.
    """
    terms, threshold_kept = [], []
    for stage, after, before in kept:
        if stage.score == "predictor":
            target = before * stage.keep if stage.keep is not None else (before - stage.r / patches).clamp(min=0.0)
            terms.append(learn.ratio_loss(after, target))
        else:
            threshold_kept.append(after)
    if threshold_kept and budget is not None:
        terms.append(learn.budget_loss(torch.stack(threshold_kept).mean(dim=0), budget))
    return sum(terms) if terms else None


@torch.no_grad()
def threshold_kept_fraction(model: torch.nn.Module, images: torch.Tensor, layers: list[int]) -> float:
    """Mean fraction of the patch tokens alive after the blocks ``layers``, hard rule, on ``images``."""
    model.eval()
    model(images)
    counts = token_counts(model)[:, layers].float() - model.num_prefix_tokens
    return float(counts.mean() / model.patch_embed.num_patches)


@torch.no_grad()
def _predict(model, images: torch.Tensor, batch_size: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """Logits (N, classes) of a patched model on ``images``, and its mean valid tokens per block."""
    model.eval()
    logits, counts = [], []
    for i in range(0, len(images), batch_size):
        logits.append(model(images[i:i + batch_size].to(device)).float().cpu())
        counts.append(token_counts(model).float().cpu())
    return torch.cat(logits), torch.cat(counts).mean().item()


def _resolve(plan: Plan, config: FinetuneConfig) -> tuple[str, str | None, bool, str | None]:
    """(model, checkpoint, pretrained, data): the config's where given, else the exported plan's meta
    (its weights only for its own model)."""
    meta = dict(plan.meta or {})
    for key in ("model", "checkpoint", "data"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise ParetokenError(f"plan: meta.{key} {meta[key]!r} is invalid; valid: a string or null")
    model = config.model or meta.get("model") or "default"
    same_model = model == meta.get("model", model)
    checkpoint = config.checkpoint if config.checkpoint is not None else (
        meta.get("checkpoint") if same_model else None)
    pretrained = config.pretrained or (config.checkpoint is None and same_model and bool(meta.get("pretrained")))
    data = config.data if config.data is not None else meta.get("data")
    return model, checkpoint, pretrained, data


def _say(log: TextIO | None, text: str) -> None:
    if log is not None:
        print(text, file=log, flush=True)


def meta_after_finetune(meta: dict[str, Any], before: Plan, after: Plan) -> dict[str, Any]:
    """An exported plan's ``meta`` once fine-tuning turned plan ``before`` into ``after``: its metrics
    (measured on the old weights) and, when learned thresholds moved, its label and preset name are
    kept as ``<key>_before_finetune`` (the first fine-tuning's when tuned again), and the label is
    ``after``'s."""
    meta = dict(meta)
    stale = ("metrics", "plan_str", "preset") if after.stages != before.stages else ("metrics",)
    for key in stale:
        value = meta.pop(key, None)
        if value is not None:
            meta.setdefault(f"{key}_before_finetune", value)
    if "plan_str" in stale and "plan_str_before_finetune" in meta:
        from paretoken.results.query import plan_label

        meta["plan_str"] = plan_label(after)
    return meta


def _diverged(what: str, step: int, total: int, config: FinetuneConfig) -> ParetokenError:
    """The one-line error of a training that diverged at ``step`` (1-based, as the log counts)."""
    return ParetokenError(f"lr: {what} at step {step}/{total} with lr {config.lr:g}; valid: a lower --lr "
                          f"(or --learned-lr, --budget-weight)")


def finetune(plan: str | Path | Plan, config: FinetuneConfig = FinetuneConfig(),
             out: str | Path = "finetuned.safetensors", log: TextIO | None = None) -> dict[str, Any]:
    """Fine-tune ``plan`` on ``config``'s model and data; write ``out`` (weights) and ``out``.yaml (plan).

    Returns a report: top1 of the uncompressed model and of the compressed model before and after,
    agreement with the uncompressed model before and after, the loss at each logged step, the
    number of steps and the written paths.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from paretoken.evaluators.data import load_split
    from paretoken.evaluators.evaluate import environment, resolve_device
    from paretoken.evaluators.models import create_model

    config.check()
    plan_path = None
    if not isinstance(plan, Plan):
        plan_path = str(Path(plan).resolve())
        plan = load_plan(plan)
    given = Path(out)
    out = check_output("out", given, (".safetensors",)).resolve()  # the plan names its weights wherever it is read
    plan_file = given.with_suffix(".yaml").resolve()
    if plan_path is not None and plan_file == Path(plan_path):
        raise ParetokenError(f"finetune: --out {str(given)!r} would write its plan over --plan {plan_path!r}; "
                             "valid: another --out")
    check_output("out", plan_file, (".yaml",))
    if config.budget is not None and not (config.learn_thresholds and any(s.op == "threshold" for s in plan.stages)):
        raise ParetokenError(_BUDGET_WITHOUT_THRESHOLDS)  # at once; a moot threshold is known with the model
    model_name, checkpoint, pretrained, data = _resolve(plan, config)
    if checkpoint is not None and Path(checkpoint).resolve() == out:
        raise ParetokenError(f"finetune: --out {str(given)!r} is the checkpoint it starts from; valid: another --out")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)

    teacher = create_model(model_name, checkpoint=checkpoint, pretrained=pretrained).to(device).eval()
    student = create_model(model_name, checkpoint=checkpoint, pretrained=pretrained).to(device)
    apply(teacher, Plan())
    apply(student, replace(plan, meta={}), init_predictors=True)
    thresholds = learn_thresholds(student) if config.learn_thresholds else {}
    if config.budget is not None and not thresholds:
        raise ParetokenError(_BUDGET_WITHOUT_THRESHOLDS)
    for p in teacher.parameters():
        p.requires_grad_(False)

    train_x, train_y = load_split(data, student, "calib", n=config.train_images, seed=config.seed)
    eval_x, eval_y = load_split(data, student, "eval", n=config.eval_images, seed=config.seed)
    base_pred = _predict(teacher, eval_x, config.batch_size, device)[0].argmax(1)

    def measure() -> dict[str, Any]:
        logits, mean_tokens = _predict(student, eval_x, config.batch_size, device)
        pred = logits.argmax(1)
        return {"top1": 100.0 * (pred == eval_y).float().mean().item(),
                "agreement": 100.0 * (pred == base_pred).float().mean().item(),
                "mean_tokens": round(mean_tokens, 2),
                "thresholds": {layer: round(m.current(), 6) for layer, m in thresholds.items()}}

    before = measure()
    budget = config.budget
    if thresholds and budget is None:
        budget = threshold_kept_fraction(student, train_x[:256].to(device), sorted(thresholds))
    uncompressed_top1 = 100.0 * (base_pred == eval_y).float().mean().item()
    steps_per_epoch = math.ceil(len(train_x) / config.batch_size)
    total = max(1, math.ceil(config.epochs * steps_per_epoch))
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    warmup = int(config.warmup * total)
    learned = [p for n, p in student.named_parameters() if _LEARNED_KEY.search(n)]
    weights = [p for n, p in student.named_parameters() if p.requires_grad and not _LEARNED_KEY.search(n)]
    optimizer = torch.optim.AdamW([{"params": weights}, {"params": learned, "lr": config.learned_lr,
                                                         "weight_decay": 0.0}],
                                  lr=config.lr, weight_decay=config.weight_decay)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    predictor_layers = [s.layer for s in plan.stages_run(len(student.blocks)) if s.score == "predictor"]
    _say(log, f"fine-tuning {model_name} with plan {plan.describe()}\n"
              f"  {len(train_x)} training images, {total} steps of {config.batch_size}, lr {config.lr:g}, "
              f"alpha {config.alpha:g}, T {config.temperature:g} on {device}\n"
              f"  before: top1 {before['top1']:.2f} (uncompressed {uncompressed_top1:.2f}), "
              f"agreement {before['agreement']:.2f}, mean tokens/block {before['mean_tokens']:.1f}"
         + (f"\n  learning thresholds {before['thresholds']} to keep {budget:.3f} of the patch tokens"
            if thresholds else "")
         + (f"\n  training predictors at layers {predictor_layers}" if predictor_layers else ""))
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[tuple[int, float]] = []
    log_every = max(1, total // 20)
    step, started = 0, time.perf_counter()
    amp = device.type == "cuda"
    while step < total:
        order = torch.randperm(len(train_x), generator=generator)
        for start in range(0, len(order), config.batch_size):
            if step >= total:
                break
            idx = order[start:start + config.batch_size]
            x, y = train_x[idx].to(device), train_y[idx].to(device)
            student.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                with torch.no_grad():
                    t_logits = teacher(x)
                s_logits = student(x)
            loss = distillation_loss(s_logits.float(), t_logits.float(), y, config.alpha, config.temperature)
            token_loss = learned_stage_loss(student._pt_state.kept, student._pt_state.patches, budget)
            if token_loss is not None:
                loss = loss + config.budget_weight * token_loss
            if not torch.isfinite(loss):
                raise _diverged(f"the loss became {loss.item()}", step + 1, total, config)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            try:
                optimizer.step()
            except RuntimeError as exc:  # an update the weights' dtype cannot hold (a huge --lr)
                if "overflow" not in str(exc):
                    raise
                raise _diverged("the update overflowed", step + 1, total, config) from None
            scheduler.step()
            losses.append((step, float(loss.item())))
            if step % log_every == 0 or step == total - 1:
                _say(log, f"  step {step + 1}/{total}  loss {loss.item():.4f}  "
                          f"({time.perf_counter() - started:.0f} s)")
            step += 1
    if not all(torch.isfinite(p).all() for p in student.parameters()):  # the last step's update
        raise _diverged("the weights became non-finite", step, total, config)
    after = measure()
    _say(log, f"  after:  top1 {after['top1']:.2f} ({after['top1'] - before['top1']:+.2f}), "
              f"agreement {after['agreement']:.2f}, mean tokens/block {after['mean_tokens']:.1f}"
              + (f", thresholds {after['thresholds']}" if thresholds else ""))

    report = {
        "model": model_name, "checkpoint_in": checkpoint, "data": data or "fashion-mnist",
        "uncompressed_top1": uncompressed_top1, "before": before, "after": after, "steps": step,
        "train_images": len(train_x), "eval_images": len(eval_x), "seconds": time.perf_counter() - started,
        "budget": budget, "predictor_layers": predictor_layers,
        "loss": [loss for _, loss in losses],
    }
    meta = dict(plan.meta or {})
    meta.update({
        "model": model_name, "checkpoint": str(out), "pretrained": False, "data": data or "fashion-mnist",
        "weights": {"file": str(out), "finetuned_from": checkpoint or ("packaged default" if model_name == "default"
                                                                       else "timm")},
        "finetune": {
            "plan_file": plan_path, "config": asdict(config), "steps": step,
            "uncompressed_top1": uncompressed_top1, "before": before, "after": after,
            "first_loss": losses[0][1] if losses else None, "last_loss": losses[-1][1] if losses else None,
            "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": {k: v for k, v in environment(config.device).items() if k not in ("threads", "cpus")},
        },
    })
    learned = learned_plan(student)
    tuned = replace(learned, meta=meta_after_finetune(meta, plan, learned))
    try:  # both files or neither
        save_file({k: v.detach().contiguous().cpu() for k, v in student.state_dict().items()
                   if ".token_threshold." not in k}, str(out))
        plan_out = tuned.save(plan_file)
    except (OSError, SafetensorError) as exc:
        out.unlink(missing_ok=True)
        raise ParetokenError(f"out: cannot write {out} and {plan_file} ({exc})") from None
    report.update({"checkpoint": str(out), "plan": str(plan_out)})
    _say(log, f"saved {out} and {plan_out}\n  measure it: paretoken eval --model {model_name} "
              f"--checkpoint {out} --plan {plan_out}" + (f" --data {data}" if data else ""))
    return report


__all__ = ["FinetuneConfig", "distillation_loss", "finetune"]
