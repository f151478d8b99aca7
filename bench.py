"""bench.py: nanoTVR's benchmarks. They time and measure things; the tests never do.

    python bench.py                     # speed: every method at ViT-B/32, 12 frames, 224 px (bf16 on a GPU)
    python bench.py --tiny              # the same on a tiny CLIP: CPU, seconds per method
    python bench.py --methods full,adapter --batch 32
    python bench.py memory              # activations per clip, with and without --grad_checkpointing
    python bench.py data                # checking, decoding and cache-reading a clip, one worker
    python bench.py clip                # clip.py's image tower vs nn.MultiheadAttention, same weights
    python bench.py quality             # train every method on the synthetic set, 3 seeds: mean ± std

speed (the default) builds every method through methods.py's METHODS table (as train.py does) on random weights (speed and memory do
not depend on them) and reports per method: trainable / total parameters, median training-step time (forward +
backward + AdamW step, after warm-up), clips/s, peak memory, evaluation throughput (video encodings/s), the FLOPs
of one step as torch's FlopCounterMode counts them, GFLOP/s and, on CUDA, the model FLOPs utilisation against the
GPU's dense bf16 peak; then the loader wait: a few steps more fed by a DataLoader reading MSR-VTT-like clips
from a frame cache, and the share of the time spent waiting for it (train.py's data_wait). Methods are
interleaved round-robin (one step of each per round), so that drift on a noisy machine hits all of them alike.
`prompt` (frozen CLIP, 8 learnable input tokens per tower) is the frozen-backbone forward + backward every
prompt method pays at least. Peak memory: on CUDA torch.cuda.max_memory_allocated over a step; on the CPU there
is no allocator peak to read, so it is the bytes autograd saves for backward (each storage once, parameters
excluded) plus the trainable parameters, their gradients and AdamW's two moments. docs/speed.md has the tables.
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.flop_counter
from torch import nn

import checks
import clip
import data
import data_checks
import frame_cache
import meanp
import quality
import synthetic
from flags import LOOP_DEFAULTS  # the loop's own keys; every other RECIPE key is a constructor argument
from loss import contrastive_loss
from methods import METHODS, PRETRAINING  # the benchmark times what train.py trains

ALL = ["zeroshot", "full", "prompt", "ump", "dgl", "dgl-linear", "adapter", "unipt", "simvtp"]
TINY = clip.CONFIGS["bench-tiny"]  # --tiny's CLIP (tests/test_cuda.py builds it by this name); else ViT-B/32's
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, for the MFU column


# ----------------------------------------------------------------------------------------------------
# What every benchmark shares: the models, a batch, one training step, the hardware line

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


def build(name, clip_cfg, frames, tiny):
    """(method, frame size) for a benchmark name on random weights, built as train.py builds it: the class and
    RECIPE from methods.METHODS (with the synthetic set's recipe for --tiny: UMP's K_d, SimVTP's tiny ViT)."""
    if name == "prompt":
        return InputPrompt(clip.CLIP(**clip_cfg), frames), clip_cfg["image_resolution"]
    cls, recipe, dataset_recipes = PRETRAINING["simvtp"] if name == "simvtp-pretrain" else METHODS[name.split("-")[0]]
    recipe = {**recipe, **(dataset_recipes.get("synthetic", {}) if tiny else {})}
    if name == "dgl-linear":
        recipe["latent"] = "linear"
    kwargs = {k: v for k, v in recipe.items() if k not in LOOP_DEFAULTS}
    if not cls.uses_clip:
        return cls(frames, size=recipe["size"], **kwargs), recipe["size"]
    return cls(clip.CLIP(**clip_cfg), frames, **kwargs), clip_cfg["image_resolution"]


def setup(name, args, device, lr):
    """-> (method on device, AdamW over its trainable parameters or None, a random batch, frame size), seeded."""
    torch.manual_seed(0)
    model, size = build(name, TINY if args.tiny else clip.CONFIGS["ViT-B/32"], args.frames, args.tiny)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=lr) if trainable else None
    return model, opt, make_batch(args.batch, args.frames, size, args.words, device), size


def state_bytes(model):
    """The trainable parameters, their gradients and AdamW's two moments."""
    return sum(p.numel() * p.element_size() * 4 for p in model.parameters() if p.requires_grad)


def make_batch(batch, frames, size, words, device):
    """Random normalised frames, all frames valid, captions of words/2 tokens (EOT mid-sequence, zeros behind)."""
    video = torch.randn(batch, frames, 3, size, size, device=device)
    text = torch.randint(1, 49000, (batch, words), device=device)
    text[:, 0], text[:, words // 2] = clip.SOT, clip.EOT
    text[:, words // 2 + 1:] = 0
    return video, torch.ones(batch, frames, dtype=torch.bool, device=device), text


def train_step(model, opt, batch, dtype):
    """train.py's step on one process: both encoders, symmetric InfoNCE, backward, AdamW."""
    video, mask, text = batch
    model.train()
    with torch.autocast(video.device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = contrastive_loss(model, model.encode_text(text), model.encode_video(video, mask), mask)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Seconds that fn() takes, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def hardware(device):
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, torch {torch.__version__}"


class SavedBytes(torch.autograd.graph.saved_tensors_hooks):
    """Counts the storages autograd saves for backward (each once), skipping the model's parameters."""

    def __init__(self, skip):
        self.skip, self.seen, self.bytes = {p.data_ptr() for p in skip}, set(), 0
        super().__init__(self.pack, lambda t: t)

    def pack(self, t):
        s = t.untyped_storage()
        if s.data_ptr() not in self.skip and s.data_ptr() not in self.seen:
            self.seen.add(s.data_ptr())
            self.bytes += s.nbytes()
        return t

    def __enter__(self):
        super().__enter__()
        return self


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


def msrvtt_like_clip(path, seed, seconds=15, fps=30, size=(320, 240)):
    """A textured, panning background with a few moving discs: an mp4v file that decodes like MSR-VTT's."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (0, 0), 3)
    centres, speeds = rng.uniform(0, [w, h], (4, 2)), rng.uniform(-4, 4, (4, 2))
    frames = []
    for t in range(int(seconds * fps)):
        frame = np.roll(base, t, axis=1).copy()  # camera pan
        for c, v in zip(centres, speeds):
            x, y = (c + v * t) % [w, h]
            cv2.circle(frame, (int(x), int(y)), 20, (255, 200, 50), -1)
        frames.append(frame)
    data.write_video(path, frames, fps)


def msrvtt_like_split(folder, clips, captions=None, seconds=15):
    """`clips` MSR-VTT-like videos written into folder, as a Split of `captions` pairs (the clips repeat)."""
    cv2.setNumThreads(1)  # no OpenCV thread pool in this process: a forked loader worker would hang on its lock
    os.makedirs(folder, exist_ok=True)
    videos = [os.path.join(folder, f"video{i}.mp4") for i in range(clips)]
    for i, path in enumerate(videos):
        msrvtt_like_clip(path, i, seconds)
    n = captions or clips
    return data.Split("msrvtt-like", videos, [f"a disc moves over a textured field {i}" for i in range(n)],
                      [i % clips for i in range(n)])


# ----------------------------------------------------------------------------------------------------
# speed: step time, FLOPs, MFU, peak memory, eval throughput, loader wait

def speed(args):
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    names, rows, models = args.methods.split(","), {}, {}
    for name in names:
        models[name] = setup(name, args, device, lr=1e-5)
        model = models[name][0]
        rows[name] = dict(method=name, trainable=clip.count_trainable(model),
                          total=sum(p.numel() for p in model.parameters()), step_s=[], eval_s=[])
    for r in range(args.warmup + args.steps):  # round-robin: one step of every method per round
        for name in names:
            model, opt, batch, _ = models[name]
            row = rows[name]
            if opt is not None:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                sync(device)
                t0 = time.perf_counter()
                if r == 0:  # first warm-up step: count the FLOPs of forward + backward (not timed)
                    with flop_counter() as fc:
                        train_step(model, opt, batch, dtype)
                    row["flops"] = fc.get_total_flops()
                elif r == args.warmup and device.type == "cpu":
                    with SavedBytes(skip=model.parameters()) as sb:
                        train_step(model, opt, batch, dtype)
                    row["peak_mem_MB"] = (sb.bytes + state_bytes(model)) / 2**20  # saved activations + p, grad, 2 moments
                else:
                    train_step(model, opt, batch, dtype)
                sync(device)
                if r >= args.warmup:
                    row["step_s"].append(time.perf_counter() - t0)
                if device.type == "cuda" and r == args.warmup:
                    row["peak_mem_MB"] = torch.cuda.max_memory_allocated(device) / 2**20
            model.eval()
            with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                t = timed(lambda: model.encode_video(batch[0], batch[1]), device)
            if r >= args.warmup:
                row["eval_s"].append(t)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    for row in rows.values():
        row["eval_videos_per_s"] = args.batch / statistics.median(row.pop("eval_s"))
        steps = row.pop("step_s")
        if steps:
            t = statistics.median(steps)
            row.update(step_ms=1e3 * t, clips_per_s=args.batch / t, gflops_per_s=row["flops"] / t / 1e9,
                       gflop_per_clip=row["flops"] / args.batch / 1e9, mfu=row["flops"] / t / peak if peak else None)
    if args.loader_steps:
        loader_wait(args, models, rows, device, dtype)
    return dict(hardware=hardware(device), dtype=str(dtype), config="tiny" if args.tiny else "ViT-B/32",
                batch=args.batch, frames=args.frames, words=args.words, steps=args.steps,
                memory="cuda max_memory_allocated" if device.type == "cuda" else
                "autograd-saved bytes + trainable p/grad/AdamW state",
                loader=f"{args.workers} workers, frame cache of {args.loader_clips} MSR-VTT-like clips"
                if args.loader_steps else None, rows=[rows[n] for n in names])


def loader_wait(args, models, rows, device, dtype):
    """Each method trains `loader_steps` more steps on uint8 batches that a DataLoader (train.py's workers,
    pinned memory) reads from a frame cache; loader_wait = time waiting for a batch / wall time, after one
    warm-up batch. The cache holds loader_clips clips read over and over: the page cache serves them."""
    tmp = tempfile.mkdtemp(prefix="nanotvr-bench-")
    try:
        sizes = {size for *_, size in models.values()}
        split = msrvtt_like_split(os.path.join(tmp, "videos"), args.loader_clips, args.batch * (args.loader_steps + 1))
        cache = os.path.join(tmp, "cache")
        frame_cache.build_frame_cache(split.videos, cache, size=max(sizes), workers=1)
        loaders = {s: data.make_loader(data.VideoTextDataset(split, frames=args.frames, words=args.words, size=s,
                                                             train=True, frame_cache=cache),
                                       batch_size=args.batch, shuffle=False, num_workers=args.workers)
                   for s in sizes}
        for name, (model, opt, _, size) in models.items():
            if opt is None:
                continue
            it = iter(loaders[size])

            def step(b):
                video = model.normalize_pixels(b["video"].to(device, non_blocking=True))
                train_step(model, opt, (video, b["video_mask"].to(device), b["text"].to(device)), dtype)
                sync(device)

            step(next(it))  # warm-up: the workers start and fill their queues
            waited, t_start = 0.0, time.perf_counter()
            for _ in range(args.loader_steps):
                t0 = time.perf_counter()
                b = next(it)
                waited += time.perf_counter() - t0
                step(b)
            rows[name]["loader_wait"] = waited / (time.perf_counter() - t_start)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def speed_table(result):
    lines = [f"Hardware: {result['hardware']}, {result['dtype']}, {result['config']}, batch {result['batch']} x "
             f"{result['frames']} frames, {result['words']} words; memory = {result['memory']}; loader: "
             f"{result['loader'] or 'not measured'}", "",
             "| method | trainable | total | step ms | clips/s | peak MB | eval videos/s | GFLOP/clip | GFLOP/s "
             "| MFU | loader wait |", "|---|" + "---:|" * 10]
    for r in result["rows"]:
        f = lambda k, fmt: fmt.format(r[k]) if r.get(k) is not None else "–"  # noqa: E731
        lines.append(f"| {r['method']} | {r['trainable']:,} | {r['total']:,} | {f('step_ms', '{:.0f}')} | "
                     f"{f('clips_per_s', '{:.1f}')} | {f('peak_mem_MB', '{:.0f}')} | "
                     f"{f('eval_videos_per_s', '{:.1f}')} | {f('gflop_per_clip', '{:.2f}')} | "
                     f"{f('gflops_per_s', '{:.0f}')} | {f('mfu', '{:.1%}')} | {f('loader_wait', '{:.0%}')} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# memory: activations per clip with and without --grad_checkpointing, the step's estimate, the CUDA peak; one
# process per method, so that one's allocations never count for another

def saved_bytes(model, clips, args, checkpointing):
    """Bytes autograd keeps over a forward + loss of `clips` clips (checkpointed: the blocks' inputs and the rest)."""
    clip.set_grad_checkpointing(model.train(), checkpointing)
    torch.manual_seed(0)
    video, mask, text = make_batch(clips, args.frames, args.size, args.words, torch.device(args.device))
    with SavedBytes(model.parameters()) as counter, torch.autocast(video.device.type, torch.bfloat16, args.amp):
        if args.one == "simvtp-pretrain":
            model.pretraining_loss(video, mask, text)
        else:
            contrastive_loss(model, model.encode_text(text), model.encode_video(video, mask), mask)
    return counter.bytes


def memory_one(args):
    """One method in this process -> dict: act_MiB (kept per clip: 2 -> 4 clips), fixed_MiB (the rest), est_GiB
    (checks.step_memory), cuda_MiB (a step's peak, after a warm-up step); *_ckpt_*: --grad_checkpointing; state_MiB."""
    dev, dtype = torch.device(args.device), torch.bfloat16 if args.amp else torch.float32
    recipe = (PRETRAINING if args.one == "simvtp-pretrain" else METHODS)[args.one.split("-")[0]][1]
    args.frames, args.words = args.frames or recipe["frames"], args.words or recipe.get("words", 32)
    model, opt, batch, args.size = setup(args.one, args, dev, lr=1e-4)
    out = dict(method=args.one, trainable=clip.count_trainable(model), state_MiB=state_bytes(model) / 2**20)
    for on, ck in ((False, ""), (True, "_ckpt")):
        two, four = (saved_bytes(model, n, args, on) for n in (2, 4))  # SimVTP's pretraining needs 2 clips
        out[f"act{ck}_MiB"], out[f"fixed{ck}_MiB"] = (four - two) / 2 / 2**20, (2 * two - four) / 2**20
        est = args.one in checks.ACTIVATION_MIB and checks.step_memory(
            model, args.one, args.frames, recipe["batch_size"] // args.gpus, on, args.amp, args.gpus)
        out.update({f"est{ck}_GiB": sum(est.values()) / 2**30} if est else {})
        for _ in range(2) if dev.type == "cuda" else ():  # a warm-up step (AdamW state, kernels), then measured
            torch.cuda.reset_peak_memory_stats(dev)
            train_step(model, opt, batch, dtype)  # checkpointed as the last saved_bytes left it
            out[f"cuda{ck}_MiB"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


def memory(args):
    if args.one:
        return print(json.dumps(memory_one(args)))
    rows, given = [], [f"--{k}={getattr(args, k)}" for k in ("frames", "words") if getattr(args, k)]
    for name in args.methods.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "memory", "--one", name, "--batch", str(args.batch),
               "--device", args.device, "--gpus", str(args.gpus), *given] + ["--tiny"] * args.tiny
        r = subprocess.run(cmd + ["--no_amp"] * (not args.amp), capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{name} failed:\n{r.stderr[-2000:]}")
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    cols = [c for c in rows[0] if c.endswith(("MiB", "GiB"))]  # state, then act, fixed, est, cuda; *_ckpt_*
    print(f"{hardware(torch.device(args.device))}; {'tiny CLIP' if args.tiny else 'ViT-B/32'}, recipe frames, words;"
          f" {'bf16 autocast' if args.amp else 'fp32'}; act per clip; cuda at --batch {args.batch}; est: recipe batch, "
          f"{args.gpus} GPU(s)\n| method | trainable | {' | '.join(cols)} |\n|---|---:|{'---:|' * len(cols)}")
    for r in rows:
        cells = [f"{r[c]:,.1f}" if c in r else "–" for c in cols]
        print(f"| {r['method']} | {r['trainable']:,} | {' | '.join(cells)} |")


# ----------------------------------------------------------------------------------------------------
# data: does the loader keep up? The start-up check, decoding and frame-cache loads per clip, one worker thread

def per_clip_ms(fn, items, repeats):
    times = []
    for _ in range(repeats):
        for i in items:
            t = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times), 1000 * min(times)


def data_rows(name, split, size, frames, repeats, tmp):
    cache = os.path.join(tmp, name.split()[0] + "-cache")
    os.makedirs(cache)
    items = range(len(split.videos))
    rows = [("start-up check (data_checks.probe_video: open, first frame)",
             per_clip_ms(lambda v: data_checks.probe_video(split.videos[v]), items, repeats))]
    for train_ in (False, True):
        ds = data.VideoTextDataset(split, frames=frames, words=32, size=size, train=train_, mode="videos")
        rows.append((f"decode {frames} frames ({'random' if train_ else 'centre'} in segments)",
                     per_clip_ms(ds.load_video, items, repeats)))
    def build_one(v):  # one video in this process, manifest written: no process pool
        frame_cache.build_frame_cache([split.videos[v]], cache, size, 3.0, workers=0)
    rows.append(("build cache (one-off: <= 3 fps, all frames)", per_clip_ms(build_one, items, 1)))
    for train_ in (False, True):
        ds = data.VideoTextDataset(split, frames=frames, words=32, size=size, train=train_, mode="videos",
                                   frame_cache=cache)
        rows.append((f"cached load, {frames} frames ({'random' if train_ else 'centre'})",
                     per_clip_ms(ds.load_video, items, repeats)))
    n = np.load(data_checks.cache_file(cache, split.videos[0]), mmap_mode="r").shape[0]
    print(f"\n{name}: {len(split.videos)} clips, output {frames}x3x{size}x{size} uint8; cache {n} frames/clip, "
          f"{os.path.getsize(data_checks.cache_file(cache, split.videos[0])) / 2**20:.1f} MiB/clip")
    print("| step | median ms/clip | min ms/clip | clips/s per worker (median) |\n|---|---:|---:|---:|")
    for label, (med, mn) in rows:
        print(f"| {label} | {med:.1f} | {mn:.1f} | {1000 / med:.1f} |")


def data_bench(args):
    cv2.setNumThreads(1)
    torch.set_num_threads(1)  # what one loader worker gets
    print(f"{hardware(torch.device('cpu'))}, 1 thread; OpenCV {cv2.__version__}")
    tmp = tempfile.mkdtemp(prefix="nanotvr-bench-")
    try:
        split = msrvtt_like_split(os.path.join(tmp, "msrvtt_like"), args.clips)
        data_rows("MSR-VTT-like 320x240 30 fps 15 s mp4v", split, 224, 12, args.repeats, tmp)
        root = synthetic.ensure_synthetic(os.path.join(tmp, "synthetic"), n_train=args.clips * 4, n_test_pairs=1)
        data_rows("synthetic 64x64 8 fps 16-24 frames mp4v", data.read_split("synthetic", "train", root), 64, 12,
                  args.repeats, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# clip: clip.py's image tower (batch-first, one SDPA call per block) vs the same model as OpenAI writes it
# (sequence-first, nn.MultiheadAttention, whose need_weights=False path also ends in SDPA: the difference is
# the layout and the copies around it). Same weights; outputs compared before timing.

CLIP_SIZES = {  # CLIP(...) arguments for the image tower; the text tower is unused and kept small
    "tiny": dict(image_resolution=32, vision_patch_size=8, vision_width=64, vision_layers=2),
    "mid": dict(image_resolution=96, vision_patch_size=16, vision_width=256, vision_layers=4),
    "b32": dict(image_resolution=224, vision_patch_size=32, vision_width=768, vision_layers=12),  # ViT-B/32
}


class SeqFirstBlock(nn.Module):
    """OpenAI's ResidualAttentionBlock: sequence-first, nn.MultiheadAttention; clip.py's parameter names."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = clip.LayerNorm(width), clip.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", clip.QuickGELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))

    def forward(self, x):  # [N, B, W]
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class SeqFirstVisual(nn.Module):
    """The ViT image tower written plainly; loads clip.py's `visual` state dict strictly."""

    def __init__(self, visual):
        super().__init__()
        width, heads = visual.conv1.out_channels, visual.transformer.resblocks[0].attn.heads
        self.conv1 = nn.Conv2d(3, width, visual.patch_size, visual.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty_like(visual.class_embedding))
        self.positional_embedding = nn.Parameter(torch.empty_like(visual.positional_embedding))
        self.ln_pre, self.ln_post = clip.LayerNorm(width), clip.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(*[SeqFirstBlock(width, heads) for _ in visual.transformer.resblocks])
        self.proj = nn.Parameter(torch.empty_like(visual.proj))
        self.load_state_dict(visual.state_dict(), strict=True)

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(2, 0, 1)  # [g*g, B, W]
        cls = self.class_embedding.to(x.dtype).expand(1, x.shape[1], -1)  # [1, B, W]
        x = self.ln_pre(torch.cat([cls, x]) + self.positional_embedding[:, None])  # [1+g*g, B, W]
        return self.ln_post(self.transformer.resblocks(x)[0]) @ self.proj  # [B, E]


def clip_bench(args):
    device = torch.device(args.device)
    iters = args.iters or {"tiny": 20, "mid": 10, "b32": 5 if device.type == "cpu" else 30}[args.size]
    torch.manual_seed(0)
    size = CLIP_SIZES[args.size]
    ours = clip.CLIP(embed_dim=512, context_length=77, vocab_size=49408, transformer_width=64, transformer_heads=1,
                     transformer_layers=1, **size).eval().to(device)
    ref = SeqFirstVisual(ours.visual).eval().to(device)
    res = size["image_resolution"]
    frames = torch.randn(args.batch, 3, res, res, device=device)
    runs = {"clip.py (SDPA, batch-first)": ours.encode_image, "nn.MultiheadAttention (seq-first)": ref}
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
        diff = (ours.encode_image(frames).float() - ref(frames).float()).abs().max().item()
        times = {name: [] for name in runs}
        for i in range(iters + 2):  # 2 warm-up rounds; alternate the order so drift hits both alike
            for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                t = timed(lambda: runs[name](frames), device)
                if i >= 2:
                    times[name].append(t)
    print(f"{hardware(device)}; size {args.size} ({res} px, patch {size['vision_patch_size']}, width "
          f"{size['vision_width']}, {size['vision_layers']} layers), batch {args.batch}, {args.dtype}, {iters} timed "
          f"calls each; max |diff| between the two = {diff:.2e}")
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, t in med.items():
        print(f"  {name:36s} {t * 1e3:9.1f} ms/batch (range {min(times[name]) * 1e3:.1f}-{max(times[name]) * 1e3:.1f})"
              f", {args.batch / t:8.1f} frames/s")
    (mine, theirs), (mine_best, theirs_best) = med.values(), [min(t) for t in times.values()]
    print(f"speed-up of clip.py over nn.MultiheadAttention: {theirs / mine:.2f}x (median), "
          f"{theirs_best / mine_best:.2f}x (best)")


# ----------------------------------------------------------------------------------------------------
# The command line: `python bench.py [speed|memory|data|clip|quality] [flags]`

def parse_args(argv):
    command = argv.pop(0) if argv and argv[0] in ("speed", "memory", "data", "clip", "quality") else "speed"
    p = argparse.ArgumentParser(prog=f"bench.py {command}", description=__doc__.split("\n")[0])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if command in ("speed", "memory"):
        p.add_argument("--tiny", action="store_true", help="a tiny CLIP and each method's synthetic settings")
        p.add_argument("--frames", type=int, default=None if command == "memory" else 12, help="memory: the recipe's")
        p.add_argument("--words", type=int, default=None if command == "memory" else 32)
        p.add_argument("--device", default=device)
    if command == "speed":
        p.add_argument("--methods", default=",".join(ALL))
        p.add_argument("--batch", type=int, default=None, help="default 32, --tiny 8")
        p.add_argument("--steps", type=int, default=10, help="timed steps per method")
        p.add_argument("--warmup", type=int, default=2, help=">= 1: the first step counts FLOPs, untimed")
        p.add_argument("--loader_steps", type=int, default=5, help="steps fed from the frame cache (0: skip)")
        p.add_argument("--loader_clips", type=int, default=8, help="MSR-VTT-like clips in that cache")
        p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers")
        p.add_argument("--out", default="bench_results", help="speed.json goes here")
    if command == "memory":
        p.add_argument("--methods", default="full,ump,dgl,adapter,unipt,simvtp,simvtp-pretrain")
        p.add_argument("--batch", type=int, default=2, help="clips per CUDA step")
        p.add_argument("--gpus", type=int, default=1, help="GPUs the recipe's global batch is split over")
        p.add_argument("--no_amp", dest="amp", action="store_false", help="fp32 (default: bf16 autocast, as train.py)")
        p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method in this process
    if command == "data":
        p.add_argument("--clips", type=int, default=4)
        p.add_argument("--repeats", type=int, default=3)
    if command == "clip":
        p.add_argument("--size", choices=CLIP_SIZES, default="mid")
        p.add_argument("--batch", type=int, default=16, help="frames per encode_image call")
        p.add_argument("--iters", type=int, default=None, help="timed calls per implementation")
        p.add_argument("--device", default=device)
        p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16 = torch.autocast")
    if command == "quality":
        p.add_argument("--methods", default=",".join(m for m in ALL if m != "prompt"))
        p.add_argument("--seeds", default="0,1,2")
        p.add_argument("--jobs", type=int, default=1, help="training runs at a time")
        p.add_argument("--out", default="bench_results", help="one folder per run, and quality.json")
    args = p.parse_args(argv)
    if command == "speed" and args.warmup < 1:
        p.error("--warmup must be at least 1: the first step counts FLOPs and is not timed")
    return command, args


def main(argv=None):
    command, args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if command == "speed":
        args.batch = args.batch or (8 if args.tiny else 32)
        result = speed(args)
        os.makedirs(args.out, exist_ok=True)
        json.dump(result, open(os.path.join(args.out, "speed.json"), "w"), indent=1)
        print(speed_table(result))
    elif command == "memory":
        memory(args)
    elif command == "data":
        data_bench(args)
    elif command == "clip":
        clip_bench(args)
    else:
        os.makedirs(args.out, exist_ok=True)
        rows = quality.quality(args)
        json.dump(rows, open(os.path.join(args.out, "quality.json"), "w"), indent=1)
        print(quality.quality_table(rows))


if __name__ == "__main__":
    main()
