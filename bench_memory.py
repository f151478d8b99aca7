"""bench_memory.py: memory of one training step, UniPT vs full fine-tuning vs a frozen-backbone prompt method.

UniPT's claim (arXiv:2308.14316) is memory: CLIP runs under no_grad and no gradient ever enters it, so the
activations autograd keeps for backward are the side network's only. This script measures one training step
(forward of both towers, symmetric InfoNCE, backward, AdamW step) for
  unipt   unipt.UniPT (side network beside frozen CLIP)
  full    CLIP4Clip meanP with every CLIP weight trainable (built here from clip.py)
  prompt  CLIP frozen, learnable input prompts (8 vision tokens after CLS, 8 text tokens after SOT): no CLIP
          weight trains, but the gradient must flow back through every CLIP activation to reach the prompts
  ump/dgl/adapter, when those files exist (built with their RECIPE defaults)
each in its own subprocess, same batch, frames, words and resolution, random weights (memory does not depend
on them).

What is measured (say which when quoting):
  saved_MiB   bytes of tensors autograd saves for backward during the forward (torch.autograd.graph.
              saved_tensors_hooks, each storage counted once, parameters excluded): the activation memory.
  state_MiB   trainable parameters + their gradients + AdamW's two moments (fp32).
  rss_MiB     CPU: peak resident-set growth over the first step (ru_maxrss after - RSS before), allocator
              noise included.
  cuda_MiB    CUDA: torch.cuda.max_memory_allocated over a step after one warm-up step (weights included).

    python bench_memory.py                        # ViT-B/32, 224 px, 12 frames, 32 words, batch 2 (CPU: minutes)
    python bench_memory.py --tiny                 # tests/conftest-sized CLIP, seconds
    python bench_memory.py --batch 32 --amp       # on a GPU, bf16 autocast as train.py
"""
import argparse
import json
import os
import resource
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

import clip
import meanp
import train  # the `full` baseline and the loss are train.py's

B32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
           context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)
TINY = dict(B32, embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64, vision_patch_size=8,
            transformer_width=64, transformer_heads=1, transformer_layers=2)


class InputPrompt(meanp.MeanP):
    """Frozen CLIP, n learnable input tokens per tower (shallow VPT / CoOp-style): gradient through CLIP."""

    def __init__(self, clip_model, num_frames, n=8):
        super().__init__(clip_model, num_frames, train_clip=False)
        self.vision_prompt = nn.Parameter(0.02 * torch.randn(n, clip_model.visual.transformer.width))
        self.text_prompt = nn.Parameter(0.02 * torch.randn(n, clip_model.transformer.width))

    def param_groups(self, weight_decay):
        return [dict(params=[self.vision_prompt, self.text_prompt], weight_decay=weight_decay)]

    def encode_text(self, text):
        m, n = self.clip, len(self.text_prompt)
        x = m.embed_text(text)  # [B, L, Wt]
        x = torch.cat([x[:, :1], self.text_prompt.expand(len(x), -1, -1), x[:, 1:]], 1)  # [B, L+n, Wt]
        x = m.transformer(x, is_causal=True)
        return m.text_head(x[torch.arange(len(x)), text.argmax(-1) + n])  # EOT moved n places right

    def encode_video(self, video, video_mask):
        v = self.clip.visual
        x = v.embed(video.flatten(0, 1))  # [B*T, 1+g*g, Wv]
        x = torch.cat([x[:, :1], self.vision_prompt.expand(len(x), -1, -1), x[:, 1:]], 1)  # [B*T, 1+n+g*g, Wv]
        frames = F.normalize(v.head(v.transformer(x)[:, 0]), dim=-1).view(*video.shape[:2], -1)  # [B, T, E]
        m = video_mask.to(frames.dtype)[:, :, None]
        return (frames * m).sum(1) / m.sum(1).clamp(min=1.0)


def build(name, clip_model, frames, tiny=False):
    if name == "prompt":
        return InputPrompt(clip_model, frames)
    cls, recipe, dataset_recipes = train.METHODS[name]
    recipe = {**recipe, **(dataset_recipes.get("synthetic", {}) if tiny else {})}
    return cls(clip_model, frames, **{k: v for k, v in recipe.items() if k not in train.STANDARD})


class SavedBytes:
    """Counts the storages autograd saves for backward (each once), skipping the model's parameters."""

    def __init__(self, skip):
        self.skip, self.seen, self.bytes = {p.data_ptr() for p in skip}, set(), 0

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.skip and s.data_ptr() not in self.seen:
            self.seen.add(s.data_ptr())
            self.bytes += s.nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def step(model, opt, batch, amp, counter=None):
    video, mask, text = batch
    with torch.autocast(video.device.type, dtype=torch.bfloat16, enabled=amp):
        if counter:
            counter.__enter__()
        loss = train.contrastive_loss(model, model.encode_text(text), model.encode_video(video, mask), mask)
        if counter:
            counter.__exit__(None, None, None)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def measure(args):
    """One method in this process: returns a dict of measurements."""
    torch.manual_seed(0)
    dev = torch.device(args.device)
    cfg = TINY if args.tiny else B32
    model = build(args.one, clip.CLIP(**cfg), args.frames, args.tiny).to(dev)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    B, T, R = args.batch, args.frames, cfg["image_resolution"]
    mask = torch.ones(B, T, dtype=torch.bool, device=dev)
    text = torch.randint(1, 49000, (B, args.words), device=dev)
    text[:, 0], text[:, -1] = 49406, 49407
    batch = (torch.randn(B, T, 3, R, R, device=dev), mask, text)
    out = dict(method=args.one, trainable=sum(p.numel() for p in trainable),
               state_MiB=sum(p.numel() * p.element_size() * 4 for p in trainable) / 2**20)  # p, grad, m, v
    if dev.type == "cuda":
        step(model, opt, batch, args.amp)  # warm-up: AdamW state and kernels allocated
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(model, opt, batch, args.amp)
        torch.cuda.synchronize()
        out["cuda_MiB"] = torch.cuda.max_memory_allocated() / 2**20
    before = rss_bytes()
    counter = SavedBytes(model.parameters())
    step(model, opt, batch, args.amp, counter)
    out["saved_MiB"] = counter.bytes / 2**20
    if dev.type == "cpu":  # first step on CPU: growth includes AdamW's moments
        out["rss_MiB"] = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2**20
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="unipt,full,prompt,ump,dgl,adapter")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--words", type=int, default=32)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (as train.py on a GPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method in this process
    args = p.parse_args()
    if args.one:
        print(json.dumps(measure(args)))
        return
    here = os.path.dirname(os.path.abspath(__file__))
    rows, notes = [], []
    for name in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", name, "--batch", str(args.batch), "--frames", str(args.frames),
               "--words", str(args.words), "--device", args.device] + ["--tiny"] * args.tiny + ["--amp"] * args.amp
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=here)
        if r.returncode:
            notes.append(f"{name}: failed\n{r.stderr[-2000:]}")
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    cols = [c for c in ("saved_MiB", "state_MiB", "rss_MiB", "cuda_MiB") if any(c in r for r in rows)]
    full = next((r for r in rows if r["method"] == "full"), None)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores visible)"
    print(f"{'tiny CLIP' if args.tiny else 'ViT-B/32'}, batch {args.batch}, {args.frames} frames, {args.words} words, "
          f"{'bf16 autocast' if args.amp else 'fp32'}, {dev}, torch {torch.__version__}")
    print(f"{'method':8s} {'trainable':>11s} " + " ".join(f"{c:>10s}" for c in cols) + "   saved+state vs full")
    for r in rows:
        total = r["saved_MiB"] + r["state_MiB"]
        ratio = total / (full["saved_MiB"] + full["state_MiB"]) if full else float("nan")
        print(f"{r['method']:8s} {r['trainable']:>11,d} " + " ".join(f"{r.get(c, float('nan')):10.1f}" for c in cols)
              + f"   {ratio:.3f}x")
    print("\n".join(notes))


if __name__ == "__main__":
    main()
