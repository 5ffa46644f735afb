"""Train the embedded default ViT on Fashion-MNIST and write its weights and model card.

    python -m paretoken.evaluators.train_default [--epochs 5] [--bf16] [--batch-size 128] [--seed 0]
        [--eval-every 1] [--out evaluators/weights/default_fmnist.safetensors]

Trains on the 60,000 train images, measures top-1 (%) on the 10,000 test images
every `--eval-every` epochs and after the last, and after every epoch overwrites the
safetensors weights and the JSON model card beside them (so an interrupted run still
leaves the last finished epoch). Recipe: AdamW, linear warm-up then cosine decay (per step),
label smoothing 0.1, gradient clipping, random crop with 2 px zero padding (in normalised space:
padding with the background value) and horizontal flip.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from paretoken.errors import ParetokenError
from paretoken.evaluators.data import FASHION_MNIST_DIR, fashion_mnist_to_model, load_fashion_mnist
from paretoken.evaluators.models import DEFAULT_WEIGHTS, build_default_architecture
from paretoken.outputs import check_output


def augment(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop with `pad` px padding and random horizontal flip of a batch (B, C, H, W)."""
    b, _, h, w = x.shape
    background = float(x.amin())  # the normalised value of a black pixel
    padded = F.pad(x, (pad, pad, pad, pad), value=background)
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(b, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(b, x.shape[1], h, w)
    out = out.gather(3, cols)
    flip = torch.rand(b, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def set_fused_attention(model: torch.nn.Module, fused: bool) -> None:
    """Switch timm attention between SDPA (fused) and explicit q@k^T, softmax, @v.

    On this CPU the explicit form is faster in bf16 at head_dim 16; fp32 inference uses SDPA.
    """
    for block in model.blocks:
        block.attn.fused_attn = fused


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy (%) of `model` on preprocessed images (N, C, H, W) with labels (N,)."""
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        correct += int((model(images[i:i + batch_size]).argmax(-1) == labels[i:i + batch_size]).sum())
    return 100.0 * correct / len(images)


def lr_at(step: int, total: int, warmup: int, base_lr: float, min_lr: float) -> float:
    """Learning rate at `step`: linear warm-up over `warmup` steps, then cosine to `min_lr`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m paretoken.evaluators.train_default", description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--clip-grad", type=float, default=1.0, help="max global gradient norm")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast and explicit (non-flash) attention for training steps; "
                        "test accuracy is always measured in fp32")
    p.add_argument("--eval-every", type=int, default=1,
                   help="measure test top-1 every N epochs (always after the last); a 10,000-image "
                        "pass costs about a minute on 2 CPU cores")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (timing runs)")
    p.add_argument("--train-images", type=int, default=None,
                   help="train on the first N train images and test on the first N test images (quick runs)")
    p.add_argument("--data", type=Path, default=FASHION_MNIST_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_WEIGHTS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for path, suffix in ((args.out, ".safetensors"), (args.out.with_suffix(".json"), ".json")):  # before training
        try:
            check_output("out", path, (suffix,))
        except ParetokenError as err:
            raise SystemExit(f"train_default: error: {err}") from None
    command = "python -m paretoken.evaluators.train_default " + " ".join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    model = build_default_architecture()
    train_x, train_y = load_fashion_mnist("train", args.data)
    test_x, test_y = load_fashion_mnist("test", args.data)
    if args.train_images is not None:
        train_x, train_y = train_x[:args.train_images], train_y[:args.train_images]
        test_x, test_y = test_x[:args.train_images], test_y[:args.train_images]
    train_x, test_x = fashion_mnist_to_model(train_x, model), fashion_mnist_to_model(test_x, model)
    train_y, test_y = torch.from_numpy(train_y), torch.from_numpy(test_y)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.999),
    )
    steps_per_epoch = len(train_x) // args.batch_size  # drop the last partial batch
    total_steps = args.epochs * steps_per_epoch
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params}  steps/epoch {steps_per_epoch}  total steps {total_steps}  "
          f"threads {torch.get_num_threads()}  bf16 {args.bf16}", flush=True)

    history: list[dict] = []
    step, start = 0, time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        set_fused_attention(model, not args.bf16)
        epoch_start, loss_sum = time.time(), 0.0
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(steps_per_epoch):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            x, y = augment(train_x[idx], generator), train_y[idx]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total_steps, args.warmup_steps, args.lr, args.min_lr)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
            loss_sum += loss.item()
            step += 1
            if step % 50 == 0:
                print(f"epoch {epoch} step {i + 1}/{steps_per_epoch} loss {loss_sum / (i + 1):.4f} "
                      f"{(time.time() - epoch_start) / (i + 1):.3f} s/step", flush=True)
            if args.max_steps is not None and step >= args.max_steps:
                print(f"stopping after {step} steps: {(time.time() - start) / step:.3f} s/step", flush=True)
                return
        train_s = time.time() - epoch_start
        set_fused_attention(model, True)
        measured = epoch % args.eval_every == 0 or epoch == args.epochs
        top1 = round(evaluate(model, test_x, test_y), 2) if measured else None
        history.append({"epoch": epoch, "train_loss": round(loss_sum / steps_per_epoch, 4), "test_top1": top1,
                        "train_s": round(train_s, 1), "epoch_s": round(time.time() - epoch_start, 1)})
        shown = "-" if top1 is None else f"{top1:.2f}%"
        print(f"EPOCH {epoch}/{args.epochs} loss {loss_sum / steps_per_epoch:.4f} test_top1 {shown} "
              f"train {train_s:.0f} s total {time.time() - start:.0f} s", flush=True)
        save(model, args, history, n_params, time.time() - start, command, default_gflops(model, test_x[:1]))


def default_gflops(model: torch.nn.Module, image: torch.Tensor) -> float:
    """fvcore GFLOPs per image (4 decimals) of the uncompressed model on one image (1, C, H, W)."""
    from paretoken.evaluators.flops import count_flops

    model.eval()
    return round(count_flops(model, image), 4)


def _layer_string(layer: torch.nn.Module) -> str:
    """A stem layer in words: ``conv3x3/2 32->64`` for a (strided) convolution, else its class name."""
    if not isinstance(layer, torch.nn.Conv2d):
        return type(layer).__name__
    stride = f"/{layer.stride[0]}" if layer.stride[0] > 1 else ""
    return f"conv{layer.kernel_size[0]}x{layer.kernel_size[1]}{stride} {layer.in_channels}->{layer.out_channels}"


def architecture_string(model: torch.nn.Module) -> str:
    """The default model's architecture in words, read from the built model."""
    embed, block = model.patch_embed, model.blocks[0]
    return (f"timm VisionTransformer(img_size={embed.img_size[0]}, in_chans={embed.proj[0].in_channels}, "
            f"num_classes={model.num_classes}, embed_dim={model.embed_dim}, depth={len(model.blocks)}, "
            f"num_heads={block.attn.num_heads}, mlp_ratio={block.mlp.fc1.out_features / model.embed_dim}, "
            f"global_pool='{model.global_pool}', embed_layer={type(embed).__name__}: "
            f"{', '.join(_layer_string(layer) for layer in embed.proj)}; "
            f"{embed.grid_size[0]}x{embed.grid_size[1]} token grid)")


def save(model: torch.nn.Module, args: argparse.Namespace, history: list[dict], n_params: int,
         wall_s: float, command: str, gflops: float) -> None:
    """Write the weights (safetensors, fp32) and the JSON model card beside them."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(args.out), metadata={"architecture": "paretoken_default"})
    card = {
        "model": "paretoken_default",
        "architecture": architecture_string(model),
        "dataset": "Fashion-MNIST (Debian dataset-fashion-mnist): train 60,000, test 10,000",
        "test_top1": history[-1]["test_top1"],
        "params": n_params,
        "gflops": gflops,
        "epochs": args.epochs,
        "epochs_completed": len(history),
        "batch_size": args.batch_size,
        "seed": args.seed,
        "optimizer": {"name": "AdamW", "lr": args.lr, "min_lr": args.min_lr, "weight_decay": args.weight_decay,
                      "betas": [0.9, 0.999], "warmup_steps": args.warmup_steps, "schedule": "linear warm-up, cosine"},
        "clip_grad_norm": args.clip_grad,
        "label_smoothing": 0.1,
        "augmentation": "random crop 28 with 2 px padding, horizontal flip p=0.5",
        "bf16_autocast": args.bf16,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "wall_time_s": round(wall_s, 1),
        "history": history,
        "command": command,
    }
    args.out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    main()
