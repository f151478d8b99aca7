"""methods.py: the methods train.py and query.py build, and how: --method's table (class, RECIPE,
DATASET_RECIPES), CLIP loaded (or the synthetic default's tiny CLIP trained), the method constructed on it,
--init loaded; and the same construction on a meta-device stand-in of the CLIP towers, so that every check of
the method and its flags runs before anything slow (checks.py)."""
import os

import torch
import torch.distributed as dist

import adapter
import checkpoints
import checks
import clip
import dgl
import meanp
import simvtp
import synthetic
import ump
import unipt


def on_sets(recipes, name):
    """A method's per-data-set recipes, with the synthetic set's from synthetic.RECIPES[name]."""
    return {**recipes, "synthetic": synthetic.RECIPES[name]}


# --method -> (class, its RECIPE, its per-data-set overrides); --stage pretrain uses PRETRAINING
METHODS = {"zeroshot": (meanp.ZeroShot, meanp.RECIPE, on_sets(meanp.DATASET_RECIPES, "full")),
           "full": (meanp.MeanP, meanp.RECIPE, on_sets(meanp.DATASET_RECIPES, "full")),
           "ump": (ump.UMP, ump.RECIPE, on_sets(ump.DATASET_RECIPES, "ump")),
           "dgl": (dgl.DGL, dgl.RECIPE, on_sets(dgl.DATASET_RECIPES, "dgl")),
           "adapter": (adapter.CrossModalAdapter, adapter.RECIPE, on_sets(adapter.DATASET_RECIPES, "adapter")),
           "unipt": (unipt.UniPT, unipt.RECIPE, on_sets(unipt.DATASET_RECIPES, "unipt")),
           "simvtp": (simvtp.SimVTP, simvtp.RECIPE, on_sets(simvtp.DATASET_RECIPES, "simvtp")),
           # the releases' own forward passes, for comparison (each file's "Reproducing the release" section)
           "ump-release": (ump.UMPRelease, ump.RECIPE, on_sets(ump.DATASET_RECIPES, "ump")),
           "adapter-release": (adapter.CrossModalAdapterRelease, adapter.RECIPE,
                               on_sets(adapter.DATASET_RECIPES, "adapter"))}
PRETRAINING = {"simvtp": (simvtp.SimVTPPretraining, simvtp.PRETRAIN_RECIPE,
                          on_sets(simvtp.PRETRAIN_DATASET_RECIPES, "simvtp_pretrain"))}


def construct(cls, clip_model, args):
    """The method on clip_model; its constructor's ValueErrors are what a user fixes with a flag."""
    try:
        if cls.uses_clip:
            return cls(clip_model, args.frames, **args.kwargs)
        return cls(args.frames, size=args.size, **args.kwargs)
    except ValueError as e:
        raise checks.RunError(f"--method {args.method}: {e}") from None


def frame_size(args, probe):
    """The run's frame size before CLIP loads: --size, else the probe's image tower's (None: known once loaded)."""
    towers = probe.modules() if probe is not None else ()
    return args.size or next((m.input_resolution for m in towers if isinstance(m, clip.VisionTransformer)), None)


def probe(args, cls, given, log, tiny=None):
    """Every check of the method and the flags before anything slow, on the method built over a meta-device
    stand-in of its CLIP towers (checks.clip_stand_in) -> that method, or None when it cannot be built so (--clip
    names a file, checked once loaded). tiny: the tiny CLIP of the synthetic default (default: no --clip and
    --data synthetic)."""
    tiny = synthetic.uses_tiny_clip(args.clip, args.data) if tiny is None else tiny
    stand_in = checks.clip_stand_in("synthetic" if tiny else args.clip or "ViT-B/32") if cls.uses_clip else None
    if cls.uses_clip and stand_in is None:
        return None
    try:
        with torch.device("meta"):
            method = construct(cls, stand_in, args)
    except checks.RunError:
        raise
    except Exception:  # a constructor that needs real tensors: checked once built
        return None
    checks.check_method(args, given, method, log)
    return method


def load_clip(args, tiny_clip_data, log):
    """--clip (a name or a file), or with tiny_clip_data (a synthetic set's folder) the tiny CLIP trained on it."""
    if tiny_clip_data is None:
        return clip.load(args.clip or "ViT-B/32")
    cache_dir = args.cache_dir or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                               "nanotvr")
    if dist.is_initialized() and dist.get_rank() > 0:  # rank 0 pretrains and caches it, the others read the cache
        dist.barrier()
    clip_model = synthetic.tiny_clip(cache_dir, tiny_clip_data, log)
    if dist.is_initialized() and dist.get_rank() == 0:
        dist.barrier()
    return clip_model


def build(args, cls, clip_model, device, log, unchecked=None):
    """-> the method on `device`, --init loaded. unchecked: the flags given, when the method could not be probed
    before the CLIP file was loaded."""
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    method = construct(cls, clip_model, args)
    if unchecked is not None:
        checks.check_method(args, unchecked, method, log)
    if args.init:
        checkpoints.load_init(method, args.init, log)
    return method.to(device)
