"""bench.py: every method side by side on one machine, in one run.

For each method: trainable / total parameters, median training-step time (forward + backward + AdamW step,
after warm-up), clips/s, peak memory, evaluation throughput (video encodings/s, no grad), and on CUDA the model
FLOPs utilisation against the GPU's bf16 peak. Methods are interleaved round-robin (one step of each per round),
so that drift on a noisy machine hits all of them alike. Weights are random: speed and memory do not depend on
them. Quality (retrieval metrics) comes from `--quality`, which trains every method on the synthetic set with
three seeds through train.py and reports mean ± std.

    python bench.py --tiny                         # CPU, tiny CLIP, seconds per method
    python bench.py                                # ViT-B/32, 12 frames, 224 px (meant for a GPU)
    python bench.py --methods full,adapter --batch 32
    python bench.py --quality --seeds 0,1,2        # train + evaluate every method on synthetic data

Peak memory: on CUDA, torch.cuda.max_memory_allocated over the step. On the CPU there is no allocator peak to
read, so we report the bytes of tensors saved for backward by autograd (activations kept alive between forward
and backward, counted once per storage, parameters excluded; bench_memory.py has the details) plus parameters, gradients and AdamW state of the trainable tensors.
"""
import argparse
import importlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import clip
import train  # the baselines, method table and loss are train.py's, so the benchmark times what trains
from bench_memory import SavedBytes  # bytes autograd saves for backward, parameters excluded

ALL = ["zeroshot", "full", "ump", "dgl", "dgl-linear", "adapter", "unipt", "simvtp"]
TINY = dict(embed_dim=64, image_resolution=64, vision_layers=4, vision_width=128, vision_patch_size=16,
            context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2, transformer_layers=4)
B32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
           context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)


def build(name, clip_cfg, frames, tiny):
    """(model, frame size) for a method name, on random weights; kwargs from the method's RECIPE."""
    if name in ("zeroshot", "full"):
        return train.MeanP(clip.CLIP(**clip_cfg), frames, train_clip=name == "full"), clip_cfg["image_resolution"]
    module_name, cls_name = train.METHODS[name.split("-")[0]]
    module = importlib.import_module(module_name)
    cls = getattr(module, cls_name)
    recipe = dict(module.RECIPE)
    if tiny:  # the method's own settings for the tiny synthetic setting (UMP's K_d, SimVTP's tiny ViT, ...)
        recipe.update(getattr(module, "DATASET_RECIPES", {}).get("synthetic", {}))
    if name == "dgl-linear":
        recipe["latent"] = "linear"
    params = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in recipe.items() if (k not in train.STANDARD or k == "size") and k in params}
    if name == "simvtp":
        return cls(frames, **kwargs), recipe.get("size", 224)
    return cls(clip.CLIP(**clip_cfg), frames, **kwargs), clip_cfg["image_resolution"]


def make_batch(batch, frames, size, words, device):
    video = torch.randn(batch, frames, 3, size, size, device=device)
    text = torch.randint(1, 49000, (batch, words), device=device)
    text[:, 0], text[:, words // 2] = clip.SOT, clip.EOT  # EOT mid-sequence, zero padding behind it
    text[:, words // 2 + 1:] = 0
    return video, torch.ones(batch, frames, dtype=torch.bool, device=device), text


def train_step(model, opt, batch, device, dtype):
    video, mask, text = batch
    model.train()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = train.contrastive_loss(model, model.encode_text(text), model.encode_video(video, mask), mask)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_speed(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cfg = TINY if args.tiny else B32
    names = args.methods.split(",")
    rows, models = {}, {}
    for name in names:
        torch.manual_seed(0)
        model, size = build(name, cfg, args.frames, args.tiny)
        model.to(device)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-5) if trainable else None
        batch = make_batch(args.batch, args.frames, size, args.words, device)
        models[name] = (model, opt, batch)
        rows[name] = dict(method=name, trainable=sum(p.numel() for p in trainable),
                          total=sum(p.numel() for p in model.parameters()), step_s=[], eval_s=[])
    for r in range(args.warmup + args.steps):  # round-robin: one step of every method per round
        for name in names:
            model, opt, batch = models[name]
            if opt is not None:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                sync(device)
                t0 = time.perf_counter()
                if r == args.warmup and device.type == "cpu":
                    with SavedBytes(skip=model.parameters()) as sb:
                        train_step(model, opt, batch, device, dtype)
                    state = sum(p.numel() * p.element_size() * 4 for p in model.parameters() if p.requires_grad)
                    rows[name]["peak_mem_MB"] = (sb.bytes + state) / 2**20  # saved activations + p, grad, 2 moments
                else:
                    train_step(model, opt, batch, device, dtype)
                sync(device)
                if r >= args.warmup:
                    rows[name]["step_s"].append(time.perf_counter() - t0)
                if device.type == "cuda" and r == args.warmup:
                    rows[name]["peak_mem_MB"] = torch.cuda.max_memory_allocated() / 2**20
            model.eval()
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                model.encode_video(batch[0], batch[1])
            sync(device)
            if r >= args.warmup:
                rows[name]["eval_s"].append(time.perf_counter() - t0)
    peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else ""
    for name in names:
        row = rows[name]
        row["eval_videos_per_s"] = args.batch / statistics.median(row.pop("eval_s"))
        steps = row.pop("step_s")
        if steps:
            row["step_ms"] = 1e3 * statistics.median(steps)
            row["clips_per_s"] = args.batch / statistics.median(steps)
        if device.type == "cuda" and steps and name in ("full", "zeroshot"):
            row["mfu"] = mfu(cfg, args, statistics.median(steps), next((v for k, v in peak.items() if k in gpu), None))
    hardware = gpu or f"{cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    return dict(hardware=hardware, torch=torch.__version__, dtype=str(dtype), config="tiny" if args.tiny else "ViT-B/32",
                batch=args.batch, frames=args.frames, words=args.words, steps=args.steps,
                memory="cuda max_memory_allocated" if device.type == "cuda" else "autograd-saved bytes + trainable p/grad/AdamW state",
                rows=[rows[n] for n in names])


def cpu_name():
    try:
        return next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def mfu(cfg, args, step_s, peak_flops):
    """Model FLOPs utilisation of full fine-tuning: 6 x params-touched-per-token x tokens (forward + backward)."""
    if peak_flops is None:
        return None
    wv, lv, wt, lt = cfg["vision_width"], cfg["vision_layers"], cfg["transformer_width"], cfg["transformer_layers"]
    n_img = (cfg["image_resolution"] // cfg["vision_patch_size"]) ** 2 + 1
    vis = args.batch * args.frames * (n_img * 12 * wv * wv * lv + 2 * n_img * n_img * wv * lv)  # MACs
    txt = args.batch * (args.words * 12 * wt * wt * lt + 2 * args.words * args.words * wt * lt)
    return 6 * (vis + txt) / step_s / peak_flops


def table(result):
    lines = [f"Hardware: {result['hardware']}, torch {result['torch']}, {result['dtype']}, {result['config']}, "
             f"batch {result['batch']} x {result['frames']} frames, {result['words']} words; memory = {result['memory']}",
             "", "| method | trainable | total | step ms | clips/s | peak MB | eval videos/s | MFU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        f = lambda k, fmt: (fmt.format(r[k]) if r.get(k) is not None else "–")
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['total']:,} | {f('step_ms', '{:.0f}')} | "
                     f"{f('clips_per_s', '{:.1f}')} | {f('peak_mem_MB', '{:.0f}')} | {f('eval_videos_per_s', '{:.1f}')} | "
                     f"{f('mfu', '{:.1%}')} |")
    return "\n".join(lines)


def quality(args):
    """Train every method on the synthetic set with several seeds via train.py; mean ± std of the last eval."""
    rows = []
    for name in args.methods.split(","):
        method, extra = (name.split("-")[0], ["--latent", "linear"]) if name == "dgl-linear" else (name, [])
        runs = []
        for seed in args.seeds.split(","):
            out = os.path.join(args.out, f"quality_{name}_seed{seed}")
            cmd = [sys.executable, "train.py", "--method", method, "--seed", seed, "--output_dir", out] + extra
            print(" ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=True)
            evals = [json.loads(l) for l in open(os.path.join(out, "log.jsonl")) if '"event": "eval"' in l]
            runs.append({f"{d} {k}": v for d in ("t2v", "v2t") for k, v in evals[-1][d].items()})
        stats = {k: (statistics.mean(r[k] for r in runs), statistics.pstdev(r[k] for r in runs)) for k in runs[0]}
        rows.append(dict(method=name, seeds=args.seeds, command=" ".join(["python", "train.py", "--method", method]
                                                                           + extra + ["--seed", "S"]), stats=stats))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny CLIP for the CPU")
    p.add_argument("--methods", default=",".join(ALL))
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--words", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quality", action="store_true")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", default="bench_results")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.quality:
        rows = quality(args)
        json.dump(rows, open(os.path.join(args.out, "quality.json"), "w"), indent=1)
        keys = list(rows[0]["stats"])
        print("| method | " + " | ".join(keys) + " | command |\n|---|" + "---:|" * len(keys) + "---|")
        for r in rows:
            cells = " | ".join(f"{m:.1f} ± {sd:.1f}" for m, sd in r["stats"].values())
            print(f"| {r['method']} | {cells} | `{r['command']}` |")
        return
    args.batch = args.batch or (8 if args.tiny else 32)
    result = bench_speed(args)
    json.dump(result, open(os.path.join(args.out, "speed.json"), "w"), indent=1)
    print(table(result))


if __name__ == "__main__":
    main()
