"""optimizer.py: how nanoTVR steps, for train.py and the synthetic set's tiny CLIP: the method's AdamW groups at
their two rates (new parameters at --lr, CLIP's at --clip_lr) and the one learning-rate schedule, linear warmup
then cosine to 0 per optimizer step (train.py deviation 2)."""
import math

MAX_LOGIT_SCALE = math.log(100)  # CLIP and CLIP4Clip clamp the learnt temperature here after every step


def param_groups(method, lr, clip_lr, weight_decay):
    """The method's AdamW groups; a group marked clip=True trains at clip_lr, the others at lr. Each group keeps
    its rate as base_lr, which lr_factor scales."""
    groups = [dict(g) for g in method.param_groups(weight_decay)]
    seen = [id(p) for g in groups for p in g["params"]]
    if sorted(seen) != sorted(id(p) for p in method.parameters() if p.requires_grad):
        raise ValueError("param_groups() must list every trainable parameter exactly once")
    for g in groups:
        g["lr"] = g["base_lr"] = clip_lr if g.pop("clip", False) else lr
    return [g for g in groups if g["params"]]


def lr_factor(step, total, warmup):
    """Linear warmup over the first warmup x total steps, then cosine to 0 (per step)."""
    w = int(warmup * total)
    return (step + 1) / w if step < w else 0.5 * (1 + math.cos(math.pi * (step - w) / max(total - w, 1)))


def set_lr(opt, step, total, warmup):
    """Every group's rate for optimizer step `step` (0-based) of `total`."""
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * lr_factor(step, total, warmup)
