"""bench_clip.py: how fast is clip.py's image tower? A benchmark, not a test.

Times `encode_image` on a batch of frames with clip.py (batch-first [B, N, W], one
F.scaled_dot_product_attention call per block) against a straightforward implementation of the same
model as OpenAI writes it (sequence-first [N, B, W], nn.MultiheadAttention, which then takes its
general path rather than the fused batch-first one; with need_weights=False, as OpenAI calls it, that path
itself ends in scaled_dot_product_attention, so the difference is the layout and the copies around it).
Both load the same weights; the script checks that their outputs agree before timing. Calls are
interleaved; the median and the best time are reported, with the hardware. On a shared machine the best
time is the steadier figure.

    python bench_clip.py                                  # mid size, CPU (under a minute on 2 cores)
    python bench_clip.py --size tiny                      # seconds
    python bench_clip.py --size b32 --device cuda --dtype bf16 --batch 256
"""
import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn

import clip

SIZES = {  # CLIP(...) arguments for the image tower; the text tower is unused and kept small
    "tiny": dict(image_resolution=32, vision_patch_size=8, vision_width=64, vision_layers=2),
    "mid": dict(image_resolution=96, vision_patch_size=16, vision_width=256, vision_layers=4),
    "b32": dict(image_resolution=224, vision_patch_size=32, vision_width=768, vision_layers=12),  # ViT-B/32
}


class Block(nn.Module):
    """OpenAI's ResidualAttentionBlock: sequence-first, nn.MultiheadAttention; same parameter names."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = clip.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", clip.QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))
        self.ln_2 = clip.LayerNorm(width)

    def forward(self, x):  # [N, B, W]
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ReferenceVisual(nn.Module):
    """The ViT image tower written plainly; loads clip.py's `visual` state dict strictly."""

    def __init__(self, visual):
        super().__init__()
        width, heads = visual.conv1.out_channels, visual.transformer.resblocks[0].attn.heads
        self.conv1 = nn.Conv2d(3, width, visual.patch_size, visual.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty_like(visual.class_embedding))
        self.positional_embedding = nn.Parameter(torch.empty_like(visual.positional_embedding))
        self.ln_pre, self.ln_post = clip.LayerNorm(width), clip.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[Block(width, heads) for _ in visual.transformer.resblocks])
        self.proj = nn.Parameter(torch.empty_like(visual.proj))
        self.load_state_dict(visual.state_dict(), strict=True)

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(2, 0, 1)  # [g*g, B, W]
        cls = self.class_embedding.to(x.dtype).expand(1, x.shape[1], -1)  # [1, B, W]
        x = self.ln_pre(torch.cat([cls, x]) + self.positional_embedding[:, None])  # [1+g*g, B, W]
        x = self.transformer.resblocks(x)
        return self.ln_post(x[0]) @ self.proj  # [B, E]


def hardware(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")]
        cpu = names[0] if names else cpu
    threads = torch.get_num_threads()
    return f"CPU {cpu}, {os.cpu_count()} cores visible, {threads} torch threads, torch {torch.__version__}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=SIZES, default="mid")
    p.add_argument("--batch", type=int, default=16, help="frames per encode_image call")
    p.add_argument("--iters", type=int, default=None, help="timed calls per implementation")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = torch.autocast")
    args = p.parse_args()
    device = torch.device(args.device)
    iters = args.iters or {"tiny": 20, "mid": 10, "b32": 5 if device.type == "cpu" else 30}[args.size]

    torch.manual_seed(0)
    size = SIZES[args.size]
    ours = clip.CLIP(embed_dim=512, context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                     transformer_layers=1, **size).eval().to(device)
    ref = ReferenceVisual(ours.visual).eval().to(device)
    res = size["image_resolution"]
    frames = torch.randn(args.batch, 3, res, res, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    runs = {"clip.py (SDPA, batch-first)": ours.encode_image, "nn.MultiheadAttention (seq-first)": ref}

    with torch.inference_mode(), autocast:
        a, b = ours.encode_image(frames).float(), ref(frames).float()
        diff = (a - b).abs().max().item()
        times = {name: [] for name in runs}
        for i in range(iters + 2):  # 2 warm-up rounds; alternate the order so drift hits both alike
            for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                runs[name](frames)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)

    print(f"hardware: {hardware(device)}")
    print(f"size {args.size} ({res}px, patch {size['vision_patch_size']}, width {size['vision_width']}, "
          f"{size['vision_layers']} layers), batch {args.batch}, {args.dtype}, {iters} timed calls each; "
          f"max |diff| between the two = {diff:.2e}")
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in med.items():
        spread = f"{min(times[name]) * 1e3:.1f}-{max(times[name]) * 1e3:.1f}"
        print(f"  {name:36s} {t * 1e3:9.1f} ms/batch (range {spread}), {args.batch / t:8.1f} frames/s")
    (mine, theirs), (mine_best, theirs_best) = med.values(), [min(t) for t in times.values()]
    print(f"speed-up of clip.py over nn.MultiheadAttention: {theirs / mine:.2f}x (median), "
          f"{theirs_best / mine_best:.2f}x (best)")


if __name__ == "__main__":
    main()
