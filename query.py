"""query.py: search videos for a caption with a trained run's checkpoint, as nanoGPT's sample.py samples from one.

  python query.py --method ump --checkpoint out/ump-synthetic/checkpoint.pt --query "a red circle moves left"
  python query.py --method zeroshot --query "a dog runs" --data msrvtt --data_path ANN --video_path VIDEOS
  python query.py --method ump --checkpoint CK --data folder --video_path DIR --query "..." --top_k 10

It takes train.py's flags (python train.py --help), and `python train.py ... --query "..."` runs it. The test
videos of --data (or every video under --video_path with --data folder, the model then built as the checkpoint's
run built it) are ranked for the caption: the --top_k best printed and drawn in <output_dir>/query.png. The
videos' features (whatever encode_video returns, with the masks) are computed once per (model, split, frame
settings) and kept next to the checkpoint as <checkpoint>.videos-<model>-<videos>.pt, so the next query only
encodes its text.
"""
import argparse
import glob
import hashlib
import io
import json
import os
import sys
import time
from contextlib import nullcontext

import torch

import checkpoints
import checks
import clip
import data
import data_checks
import files
import flags
import methods
import pictures
import retrieval
import synthetic



def fingerprint(path):
    """A file's identity without reading all of it: size, mtime and sha256 of its first and last MiB."""
    st = os.stat(path)
    h = hashlib.sha256(f"{st.st_size} {st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(2 ** 20))
        f.seek(max(st.st_size - 2 ** 20, 0))
        h.update(f.read())
    return h.hexdigest()


def video_cache_keys(split, args):
    """-> (file prefix, model key, videos key): the cache of this split's features under this model is
    <checkpoint>.videos-<model key>-<videos key>.pt (no checkpoint: <output_dir>/videos-...pt)."""
    sources = [fingerprint(p) if p and os.path.isfile(p) else p for p in (args.checkpoint, args.clip, args.init)]
    tiny = synthetic.uses_tiny_clip(args.clip, args.data)  # else the checkpoint's fingerprint tells the backbone
    model = dict(method=args.method, kwargs=args.kwargs, backbone="tiny CLIP" if tiny else args.clip, files=sources)
    stats = [(v, os.path.getsize(v), os.path.getmtime(v)) for v in split.videos]
    videos = dict(videos=stats, frames=args.frames, size=args.size, max_seconds=split.max_seconds,
                  frame_cache=args.frame_cache and (args.frame_cache, data_checks.read_manifest(args.frame_cache)))
    keys = [hashlib.sha256(json.dumps(x, sort_keys=True, default=str).encode()).hexdigest()[:12] for x in (model, videos)]
    prefix = f"{args.checkpoint}.videos" if args.checkpoint else os.path.join(args.output_dir, "videos")
    return prefix, *keys


def read_cache(path, videos):
    """-> (video features, video_mask) from the cache file of these videos, or None: no such file, another video
    list, or a damaged file (cut off by a crash or a full disk: said, and encoded again)."""
    if not os.path.isfile(path):
        return None
    try:  # a cache is disposable: whatever is wrong with it, the videos are encoded again
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached["videos"] != videos:
            return None
        video, mask = cached["video"], cached["mask"]
        if not (isinstance(video, torch.Tensor) and isinstance(mask, torch.Tensor) and len(video) == len(mask) == len(videos)):
            raise ValueError(f"{type(video).__name__} features and a {type(mask).__name__} mask for {len(videos)} videos")
    except Exception as e:  # RuntimeError (not a zip: cut off), EOFError, KeyError, TypeError, ValueError
        why = (str(e).strip() or type(e).__name__).splitlines()[0].split(". ")[0]
        print(f"WARNING: the video feature cache {path} is damaged ({why}); encoding the videos again",
              file=sys.stderr, flush=True)
        return None
    return video, mask


@torch.no_grad()
def video_features(method, split, args, device, amp, log=print):
    """-> (video features, video_mask) of every video of the split, and keep(): None when they came from the
    cache file, else the function that caches them (called once the results are printed: a failed write only
    costs the next query's time)."""
    prefix, model_key, videos_key = video_cache_keys(split, args)
    path = f"{prefix}-{model_key}-{videos_key}.pt"
    cached = read_cache(path, list(split.videos))
    if cached:
        log(f"video features of {len(split.videos)} videos from {path}")
        return cached[0].to(device), cached[1].to(device), None
    was_training = method.training
    method.eval()
    t0 = time.time()
    video, mask = retrieval.encode(method, split, "videos", args, device, amp)
    method.train(was_training)
    log(f"encoded {len(split.videos)} videos in {time.time() - t0:.1f} s")

    def keep():
        cache = io.BytesIO()  # serialised first: the file write below fails with an OSError, not torch's RuntimeError
        torch.save(dict(video=video.cpu(), mask=mask.cpu(), videos=list(split.videos)), cache)
        try:
            for old in glob.glob(glob.escape(prefix) + "-*.pt"):  # made before the checkpoint changed: never hit again
                if not old.startswith(f"{prefix}-{model_key}-"):
                    os.remove(old)
            files.atomic_write(path, lambda tmp: files.write_bytes(tmp, cache.getbuffer()))
        except OSError as e:  # a read-only mount or a full disk beside the checkpoint
            print(f"WARNING: the video features were not cached ({path}: {e.strerror or e}); the next query encodes "
                  f"the {len(split.videos)} videos again", file=sys.stderr, flush=True)
            return
        log(f"video features cached in {path}")
    return video, mask, keep


@torch.no_grad()
def search(method, query, split, args, device, amp, picture=None, log=print):
    """The args.top_k videos of the split for a caption: -> [(video path, score)], best first; printed, and drawn
    into `picture` (a PNG path) when given."""
    video, mask, keep = video_features(method, split, args, device, amp, log)
    was_training = method.training
    method.eval()
    with amp:
        text = method.encode_text(data.tokenize(query, args.words)[None].to(device)).float()
    scores = retrieval.similarity(method, text, video, mask)[0].cpu()
    method.train(was_training)
    best, order = scores.topk(min(args.top_k, len(scores)))
    hits = list(zip(order.tolist(), best.tolist()))
    described = pictures.first_captions(split)
    log(f"query {query!r}: the top {len(hits)} of {len(split.videos)} videos (rank, score, file"
        + (", its caption)" if described else ")"))
    for k, (v, s) in enumerate(hits):
        log(f"{k + 1:>4}  {s:8.3f}  {split.videos[v]}" + (f"  {described[v]!r}" if v in described else ""))
    if keep:
        keep()
    if picture:
        pictures.write_query(picture, query, hits, split,
                             f"{args.method}: the top {len(hits)} of {len(split.videos)} videos of {split.name}")
        log(f"picture: {picture}")
    return [(split.videos[v], s) for v, s in hits]


def run_settings(args, run, log=print):
    """--data folder has no recipe: the model as the checkpoint's run built it (backbone, frames, words, frame
    size, method flags), whatever the command line says. run: the checkpoint's args -> (those settings, the
    synthetic set its tiny CLIP was trained on, or None)."""
    tiny = synthetic.uses_tiny_clip(run["clip"], run["data"])
    tiny_clip_data = synthetic.ensure_synthetic(run["data_path"]) if tiny else None
    backbone = "the tiny CLIP" if tiny_clip_data else f"--clip {run['clip'] or 'ViT-B/32'}"
    log(f"--data folder: the model as {args.checkpoint}'s run built it ({run['data']}): {backbone}, --max_frames "
        f"{run['frames']} --max_words {run['words']} --size {run['size']}")
    settings = dict(vars(args), **{k: run[k] for k in ("clip", "frames", "words", "size", "kwargs")},
                    sampling=run.get("sampling", "segments"))  # as the run sampled its test videos
    return argparse.Namespace(**settings), tiny_clip_data


def main(argv=None):
    """-> the hits, [(video path, score)] best first."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, cls, given = flags.parse_args(argv, prog="query.py")
    if not args.query:
        flags.fail('query.py needs --query "a caption" (python query.py --help)')
    device = torch.device(args.device)
    amp_dtype = flags.amp_dtype(args.precision, device)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    try:
        tiny_clip_data = None  # the synthetic set the tiny CLIP is trained on (synthetic.tiny_clip)
        folder = args.data == "folder"
        ck = args.checkpoint and checkpoints.read(args.checkpoint, "--checkpoint", ("model", "args") if folder else ("model",))
        run = ck["args"] if ck and isinstance(ck.get("args"), dict) else {}
        if run.get("method", args.method) != args.method:  # its tensors and method flags are another method's
            raise checks.RunError(f"--checkpoint {args.checkpoint} holds a {run['method']} model (its run's --method): "
                                  f"pass --method {run['method']}")
        differ = {k: v for k, v in run.get("kwargs", {}).items() if k in given and args.kwargs.get(k) != v}
        if differ:  # the model would not be the one its tensors were trained in
            raise checks.RunError(f"--checkpoint {args.checkpoint} was trained with " + ", ".join(
                f"--{k} {v}" for k, v in differ.items()) + f", not {', '.join(f'--{k} {args.kwargs[k]}' for k in differ)}"
                ": leave the method's flags out (the checkpoint's are used)")
        args.kwargs.update({k: v for k, v in run.get("kwargs", {}).items() if k in args.kwargs})
        if folder and ck:
            args, tiny_clip_data = run_settings(args, run)
        probe = methods.probe(args, cls, given, print, tiny=tiny_clip_data is not None if folder else None)
        if args.data == "synthetic":
            args.data_path = synthetic.ensure_synthetic(args.data_path)
            tiny_clip_data = args.data_path if synthetic.uses_tiny_clip(args.clip, args.data) else None
        split = data.read_split(args.data, "test", args.data_path, args.video_path, args.allow_missing)
        data_checks.check_videos(split, args.frame_cache)
        clip_model = methods.load_clip(args, tiny_clip_data, print) if cls.uses_clip else None
        args.size = args.size or (clip_model.visual.input_resolution if clip_model else None)
        method = methods.build(args, cls, clip_model, device, print, given if probe is None else None)
        if ck:
            checkpoints.load_trainable(method, ck, args.checkpoint)
        os.makedirs(args.output_dir, exist_ok=True)
        return search(method, args.query, split, args, device, amp, os.path.join(args.output_dir, "query.png"))
    except (checks.RunError, data.DataError, clip.ModelFileError) as e:  # the fix is the user's: the message says it
        flags.fail(e, getattr(e, "status", 2))


if __name__ == "__main__":
    main()
