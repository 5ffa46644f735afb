"""An independent, slow formulation of every reducer, for tests.

One image at a time, tokens as Python lists, attention written out with an
explicit softmax (no SDPA), each op as its paper describes it. Shares no code
with paretoken.compress.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _round_keep(n: int, keep: float | None, r: int | None) -> int:
    k = int(math.floor(n * keep + 0.5)) if keep is not None else n - r
    return max(1, min(n, k))


def _stage_score(stage, A, head_out):
    """Score per token from attention probs A (H, N, N) and head outputs (H, N, D)."""
    cls = A[:, 0, :]
    if stage["score"] == "head_weighted":
        norms = torch.stack([head_out[h].pow(2).sum().sqrt() for h in range(A.shape[0])])
        w = norms / norms.sum()
        s = sum(w[h] * cls[h] for h in range(A.shape[0]))
    else:
        s = cls.mean(0)
    if stage["op"] == "slim":
        mean_a = A.mean(0)
        s = torch.stack([sum(s[i] * mean_a[i, j] for i in range(A.shape[1])) for j in range(A.shape[1])])
    return s


def _fused(members, tokens, sizes, fuse):
    """The token and size that ``members`` (indices, the token merged into first) become."""
    head = members[0]
    if fuse == "drop":  # ToFu's pruning: the token merged into stays as it is, the others are gone
        return tokens[head], sizes[head]
    total = sum(sizes[j] for j in members)
    mean = sum(tokens[j] * sizes[j] for j in members) / total
    if fuse == "mlerp" and len(members) > 1:  # ToFu: the average, at the largest norm of the tokens merged
        mean = mean / mean.norm() * max(float(tokens[j].norm()) for j in members)
    return mean, total


def _apply_stage(stage, tokens, sizes, score, keys, prefix):
    """tokens: list of (C,) tensors; sizes: list of floats; returns new lists."""
    n_all = len(tokens)
    patches = list(range(prefix, n_all))
    n = len(patches)
    op = stage["op"]
    by_score = sorted(patches, key=lambda j: (-float(score[j]), j))
    if op in ("prune", "slim", "prune_fuse"):
        k = _round_keep(n, stage.get("keep"), stage.get("r"))
        kept = sorted(by_score[:k])
        new_t = [tokens[j] for j in range(prefix)] + [tokens[j] for j in kept]
        new_s = [sizes[j] for j in range(prefix)] + [sizes[j] for j in kept]
        dropped = by_score[k:]
        if op == "prune_fuse" and dropped:
            wsum = sum(float(score[j]) for j in dropped)
            new_t.append(sum(float(score[j]) * tokens[j] for j in dropped) / wsum)
            new_s.append(sum(sizes[j] for j in dropped))
        return new_t, new_s
    if op == "merge":  # ToMe, transcribed: alternate split, best match, r best edges, weighted average
        r = n - _round_keep(n, stage["keep"], None) if stage.get("keep") is not None else stage["r"]
        a_idx = [i for i in range(0, n_all, 2) if i >= prefix]
        b_idx = [j for j in range(1, n_all, 2) if j >= prefix]
        unit = F.normalize(keys, dim=-1)
        edges = []
        for i in a_idx if b_idx else []:  # no B token (one patch token left): nothing merges
            sims = [float(unit[i] @ unit[j]) for j in b_idx]
            best = max(range(len(b_idx)), key=lambda t: (sims[t], -t))
            edges.append((sims[best], i, b_idx[best]))
        edges.sort(key=lambda e: -e[0])
        merged = edges[:min(r, len(edges))]
        groups = {j: [j] for j in b_idx}
        for _, i, j in merged:
            groups[j].append(i)
        gone = {i for _, i, _ in merged}
        order = list(range(prefix)) + [i for i in a_idx if i not in gone] + b_idx
        fused = {j: _fused(groups[j], tokens, sizes, stage.get("fuse", "average")) for j in b_idx}
        return ([fused[j][0] if j in fused else tokens[j] for j in order],
                [fused[j][1] if j in fused else sizes[j] for j in order])
    if op == "pitome":  # PiToMe: energy, the 2r highest-energy tokens alternate into A and B, A merges into B
        r = n - _round_keep(n, stage["keep"], None) if stage.get("keep") is not None else stage["r"]
        r = min(r, n // 2)
        unit = F.normalize(keys, dim=-1)
        elu = lambda v: v if v > 0 else math.exp(v) - 1.0  # noqa: E731
        energy = {i: sum(elu(float(unit[i] @ unit[j]) - stage["margin"]) for j in patches) / n for i in patches}
        by_energy = sorted(patches, key=lambda i: (-energy[i], i))
        a_set, b_set = by_energy[:2 * r:2], by_energy[1:2 * r:2]
        groups = {j: [j] for j in b_set}
        for i in a_set:
            sims = {j: float(unit[i] @ unit[j]) for j in b_set}
            groups[max(b_set, key=lambda j: (sims[j], -j))].append(i)
        keep = [j for j in patches if j not in a_set]
        fused = {j: _fused(groups[j], tokens, sizes, stage.get("fuse", "average")) for j in b_set}
        return ([tokens[j] for j in range(prefix)] + [fused[j][0] if j in fused else tokens[j] for j in keep],
                [sizes[j] for j in range(prefix)] + [fused[j][1] if j in fused else sizes[j] for j in keep])
    if op == "prune_merge":  # DiffRate: drop the lowest-scoring, merge the next lowest into the most similar kept
        k = _round_keep(n, None, stage["pruned"])
        m = min(stage["merged"], k - 1)
        targets, sources = by_score[:k - m], by_score[k - m:k]
        unit = [t / t.norm() for t in tokens]
        groups = {j: [j] for j in targets}
        for i in sources:
            sims = {j: float(unit[i] @ unit[j]) for j in targets}
            groups[max(targets, key=lambda j: (sims[j], -j))].append(i)
        fused = {j: _fused(groups[j], tokens, sizes, stage.get("fuse", "average")) for j in targets}
        kept = sorted(targets)
        return ([tokens[j] for j in range(prefix)] + [fused[j][0] for j in kept],
                [sizes[j] for j in range(prefix)] + [fused[j][1] for j in kept])
    if op == "joint":  # JMP
        total = sum(float(score[j]) for j in patches)
        critical, held = [], 0.0
        for j in by_score:
            if critical and held >= stage["mass"] * total - 1e-6 * total:
                break
            critical.append(j)
            held += float(score[j])
        unit = F.normalize(keys, dim=-1)
        acc = {c: (tokens[c] * sizes[c], sizes[c]) for c in critical}
        for j in patches:
            if j in acc:
                continue
            sims = {c: float(unit[j] @ unit[c]) for c in critical}
            c = max(critical, key=lambda c: (sims[c], -c))
            if sims[c] >= stage["sim"]:
                acc[c] = (acc[c][0] + tokens[j] * sizes[j], acc[c][1] + sizes[j])
        kept = sorted(critical)
        return ([tokens[j] for j in range(prefix)] + [acc[c][0] / acc[c][1] for c in kept],
                [sizes[j] for j in range(prefix)] + [acc[c][1] for c in kept])
    if op == "threshold":  # AS-ViT, score relative to uniform attention
        total = sum(float(score[j]) for j in patches)
        keep = [j for j in patches if float(score[j]) * n / total > stage["threshold"] or j == by_score[0]]
        return ([tokens[j] for j in range(prefix)] + [tokens[j] for j in keep],
                [sizes[j] for j in range(prefix)] + [sizes[j] for j in keep])
    raise ValueError(op)


@torch.no_grad()
def reference_forward(model, image: torch.Tensor, stages: list[dict]) -> tuple[torch.Tensor, list[int]]:
    """Logits (num_classes,) and per-block token counts for one image (C, H, W) of an unpatched model."""
    prefix = model.num_prefix_tokens
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(image[None]))))[0]
    tokens, sizes = list(x), [1.0] * x.shape[0]
    by_layer = {s["layer"]: s for s in stages}
    counts = []
    for layer, blk in enumerate(model.blocks):
        x = torch.stack(tokens)
        att = blk.attn
        n, heads = x.shape[0], att.num_heads
        qkv = att.qkv(blk.norm1(x)).reshape(n, 3, heads, att.head_dim).permute(1, 2, 0, 3)
        q, k, v = att.q_norm(qkv[0]), att.k_norm(qkv[1]), qkv[2]
        logits = torch.einsum("hid,hjd->hij", q, k) * att.scale + torch.tensor(sizes).log()[None, None, :]
        A = torch.exp(logits - logits.max(-1, keepdim=True).values)
        A = A / A.sum(-1, keepdim=True)
        head_out = torch.einsum("hij,hjd->hid", A, v)
        x = x + blk.ls1(att.proj(att.norm(head_out.permute(1, 0, 2).reshape(n, -1))))
        tokens = list(x)
        if layer in by_layer:
            stage = dict(by_layer[layer])
            stage.setdefault("score", {"merge": "keys", "pitome": "keys", "threshold": "head_weighted"}.get(
                stage["op"], "cls_attn"))
            score = _stage_score(stage, A, head_out)
            tokens, sizes = _apply_stage(stage, tokens, sizes, score, k.mean(0), prefix)
        x = torch.stack(tokens)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        tokens = list(x)
        counts.append(len(tokens))
    x = model.norm(torch.stack(tokens)[None])
    return model.forward_head(x)[0], counts


def vit_gflops(tokens: int, dim: int, depth: int, mlp_hidden: int, classes: int, stem_macs: int) -> float:
    """GFLOPs per image of an uncompressed pre-norm ViT with a class token, by hand, in fvcore's
    convention (one multiply-add is one FLOP; a LayerNorm with affine counts 5 per element; softmax,
    GELU and residual adds count zero).

    tokens: sequence length including the class token; dim: width; mlp_hidden: MLP hidden width;
    stem_macs: multiply-adds of the patch embedding. Per block: qkv (3) and proj (1) N*D^2, q@k^T and
    attn@v N^2*D each, two MLP layers N*D*hidden each, two LayerNorms; then the final LayerNorm on
    every token and the head on the class token.
    """
    block = 4 * tokens * dim * dim + 2 * tokens * tokens * dim + 2 * tokens * dim * mlp_hidden + 2 * 5 * tokens * dim
    return (stem_macs + depth * block + 5 * tokens * dim + dim * classes) / 1e9


def prefix_only_last_saving(tokens: int, prefix: int, dim: int, mlp_hidden: int) -> float:
    """GFLOPs per image that a last block computing only the ``prefix`` tokens saves, by hand (fvcore's
    convention): each other token of the ``tokens`` entering it skips its query projection (D^2), its
    attention row (q@k^T and attn@v, N*D each), the output projection (D^2), the MLP (2*D*hidden), the
    block's second LayerNorm and the model's final one (5*D each); it is still a key and value (k, v
    projections and the block's first LayerNorm)."""
    per_token = 2 * dim * dim + 2 * tokens * dim + 2 * dim * mlp_hidden + 2 * 5 * dim
    return (tokens - prefix) * per_token / 1e9


def conv_macs(out_hw: int, in_ch: int, out_ch: int, kernel: int) -> int:
    """Multiply-adds of a square convolution with an ``out_hw`` x ``out_hw`` output."""
    return out_hw * out_hw * out_ch * in_ch * kernel * kernel


#: The embedded default model (28x28x1 in; conv 3x3 to 32 channels at 28x28, conv 3x3 stride 2 to 64
#: at 14x14: 196 patch tokens + class token; 12 blocks of width 64, MLP 256; 10 classes), by hand.
DEFAULT_GFLOPS = vit_gflops(tokens=197, dim=64, depth=12, mlp_hidden=256, classes=10,
                            stem_macs=conv_macs(28, 1, 32, 3) + conv_macs(14, 32, 64, 3))
#: DeiT-S at 224 pixels (16x16 patches: 196 + class token; 12 blocks of width 384, MLP 1536; 1000 classes).
DEIT_S_GFLOPS = vit_gflops(tokens=197, dim=384, depth=12, mlp_hidden=1536, classes=1000,
                           stem_macs=conv_macs(14, 3, 384, 16))
