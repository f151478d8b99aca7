"""bench.py: every method side by side on one machine, in one run.

For each method: trainable / total parameters, median training-step time (forward + backward + AdamW step,
after warm-up), clips/s, peak memory, evaluation throughput (video encodings/s, no grad), the FLOPs of one step
as torch's FlopCounterMode counts them, the GFLOP/s achieved and, on CUDA, the model FLOPs utilisation against
the GPU's dense bf16 peak. `prompt` (frozen CLIP, 8 learnable input tokens per tower) is the frozen-backbone
forward + backward that the prompt methods are measured against. Methods are interleaved round-robin (one step
of each per round), so that drift on a noisy machine hits all of them alike. Weights are random: speed and
memory do not depend on them. Quality (retrieval metrics) comes from `--quality`, which trains every method on
the synthetic set with three seeds through train.py and reports mean ± std.

    python bench.py --tiny                         # CPU, tiny CLIP, seconds per method
    python bench.py                                # ViT-B/32, 12 frames, 224 px (meant for a GPU)
    python bench.py --methods full,adapter --batch 32
    python bench.py --quality --seeds 0,1,2        # train + evaluate every method on synthetic data
    python bench.py --quality --jobs 2             # two training runs at a time, one CPU thread each

Peak memory: on CUDA, torch.cuda.max_memory_allocated over the step. On the CPU there is no allocator peak to
read, so we report the bytes of tensors saved for backward by autograd (activations kept alive between forward
and backward, counted once per storage, parameters excluded; bench_memory.py has the details) plus parameters,
gradients and AdamW state of the trainable tensors.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

import torch
import torch.utils.flop_counter

import clip
import train  # the baselines, method table and loss are train.py's, so the benchmark times what trains
from bench_memory import InputPrompt, SavedBytes  # shallow-prompt baseline; bytes autograd saves for backward

ALL = ["zeroshot", "full", "prompt", "ump", "dgl", "dgl-linear", "adapter", "unipt", "simvtp"]
TINY = dict(embed_dim=64, image_resolution=64, vision_layers=4, vision_width=128, vision_patch_size=16,
            context_length=77, vocab_size=49408, transformer_width=128, transformer_heads=2, transformer_layers=4)
B32 = dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768, vision_patch_size=32,
           context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8, transformer_layers=12)


def build(name, clip_cfg, frames, tiny):
    """(model, frame size) for a method name, on random weights; kwargs from the method's RECIPE."""
    if name == "prompt":  # the frozen-backbone forward + backward every prompt method pays at least
        return InputPrompt(clip.CLIP(**clip_cfg), frames), clip_cfg["image_resolution"]
    cls, recipe, dataset_recipes = train.METHODS[name.split("-")[0]]
    recipe = dict(recipe)
    if tiny:  # the method's own settings for the tiny synthetic setting (UMP's K_d, SimVTP's tiny ViT, ...)
        recipe.update(dataset_recipes.get("synthetic", {}))
    if name == "dgl-linear":
        recipe["latent"] = "linear"
    kwargs = {k: v for k, v in recipe.items() if k not in train.STANDARD}
    if not cls.uses_clip:
        return cls(frames, size=recipe.get("size", 224), **kwargs), recipe.get("size", 224)
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
                if r == 0:  # first warm-up step: count the FLOPs of forward + backward (not timed)
                    with flop_counter() as fc:
                        train_step(model, opt, batch, device, dtype)
                    rows[name]["flops"] = fc.get_total_flops()
                elif r == args.warmup and device.type == "cpu":
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
        if steps and "flops" in row:
            row["gflops_per_s"] = row["flops"] / statistics.median(steps) / 1e9
            row["gflop_per_clip"] = row["flops"] / args.batch / 1e9
            peak_flops = next((v for k, v in peak.items() if k in gpu), None)
            row["mfu"] = row["flops"] / statistics.median(steps) / peak_flops if peak_flops else None
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


def flop_counter():
    """torch's FlopCounterMode (matmuls, convolutions, fused attention), taught the CPU's fused attention kernel,
    for which torch has no formula. Counted FLOPs of one step, forward + backward; MFU = FLOPs / time / peak."""
    fc = torch.utils.flop_counter
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = \
            lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v)
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
            lambda g, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(g, q, k, v)
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)


def table(result):
    lines = [f"Hardware: {result['hardware']}, torch {result['torch']}, {result['dtype']}, {result['config']}, "
             f"batch {result['batch']} x {result['frames']} frames, {result['words']} words; memory = {result['memory']}",
             "", "| method | trainable | total | step ms | clips/s | peak MB | eval videos/s | GFLOP/clip | GFLOP/s "
                 "| MFU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        f = lambda k, fmt: (fmt.format(r[k]) if r.get(k) is not None else "–")
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['total']:,} | {f('step_ms', '{:.0f}')} | "
                     f"{f('clips_per_s', '{:.1f}')} | {f('peak_mem_MB', '{:.0f}')} | {f('eval_videos_per_s', '{:.1f}')} | "
                     f"{f('gflop_per_clip', '{:.2f}')} | {f('gflops_per_s', '{:.0f}')} | "
                     f"{f('mfu', '{:.1%}')} |")
    return "\n".join(lines)


def quality(args):
    """Train every method on the synthetic set with several seeds via train.py; mean ± std of the last eval.

    Runs go `--jobs` at a time, the CPU threads split between them. A finished run leaves final_eval.json in its
    directory and is not trained again, so an interrupted `--quality` picks up where it stopped."""
    runs, queue, running = {}, [], []
    for name in args.methods.split(","):
        method, extra = (name.split("-")[0], ["--latent", "linear"]) if name == "dgl-linear" else (name, [])
        for seed in args.seeds.split(","):
            out = os.path.join(args.out, f"quality_{name}_seed{seed}")
            runs[name, seed] = out
            if not os.path.exists(os.path.join(out, "final_eval.json")):
                queue.append((out, ["train.py", "--method", method, "--seed", seed, "--output_dir", out] + extra))
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.jobs)))
    while queue or running:
        while queue and len(running) < args.jobs:
            out, cmd = queue.pop(0)
            shutil.rmtree(out, ignore_errors=True)  # an unfinished run starts over: its log would mix two runs
            os.makedirs(out)
            print("python " + " ".join(cmd), flush=True)
            log = open(os.path.join(out, "stdout.txt"), "w")
            proc = subprocess.Popen([sys.executable] + cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            running.append((out, cmd, proc))
        time.sleep(1)
        for job in [j for j in running if j[2].poll() is not None]:
            running.remove(job)
            out, cmd, proc = job
            if proc.returncode:
                sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); its output is in {out}/stdout.txt")
            evals = [json.loads(l) for l in open(os.path.join(out, "log.jsonl")) if '"event": "eval"' in l]
            json.dump(evals[-1], open(os.path.join(out, "final_eval.json"), "w"))
    rows = []
    for name in args.methods.split(","):
        finals = [json.load(open(os.path.join(runs[name, s], "final_eval.json"))) for s in args.seeds.split(",")]
        metrics = [{f"{d} {k}": v for d in ("t2v", "v2t") for k, v in e[d].items()} for e in finals]
        stats = {k: (statistics.mean(m[k] for m in metrics), statistics.pstdev(m[k] for m in metrics))
                 for k in metrics[0]}
        extra = " --latent linear" if name == "dgl-linear" else ""
        rows.append(dict(method=name, seeds=args.seeds, stats=stats,
                         command=f"python train.py --method {name.split('-')[0]}{extra} --seed S"))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny CLIP for the CPU")
    p.add_argument("--methods", default=None, help=f"default: {','.join(ALL)} (--quality: all but prompt)")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--words", type=int, default=32)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quality", action="store_true")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--jobs", type=int, default=1, help="--quality: training runs at a time")
    p.add_argument("--out", default="bench_results")
    args = p.parse_args()
    if args.warmup < 1:
        p.error("--warmup must be at least 1: the first step counts FLOPs and is not timed")
    os.makedirs(args.out, exist_ok=True)
    args.methods = args.methods or ",".join(m for m in ALL if not (args.quality and m == "prompt"))
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
