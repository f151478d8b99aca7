"""Write tests/fixtures/clip4clip_metrics.pt: CLIP4Clip's own metric functions run on fixed similarity matrices.

Not part of nanoTVR: the project and the tests never import this file. It imports metrics.py from a checkout of
CLIP4Clip (ArrowLuo/CLIP4Clip, commit 508ffa3de39ba0563a03199c440ab602a72e9b6f, its HEAD on 2026-12-01) and
calls its functions the way its main_task_retrieval.py `eval_epoch` does:
  single caption per video  compute_metrics(sim) for t2v, compute_metrics(sim.T) for v2t
  several captions          the [Nt, Nv] matrix cut into one block of rows per video, each padded to the
                            largest caption count with -inf and stacked to [Nv, max captions, Nv];
                            t2v = tensor_text_to_video_metrics(that), v2t = compute_metrics(
                            tensor_video_to_text_sim(that))
The fixture holds, per case, the float32 matrix, the caption -> video map and CLIP4Clip's R@1, R@5, R@10,
median rank and mean rank for both directions (float64), with the commit and the torch and numpy versions.
For the multi-caption cases it also holds `t2v_stable`: tensor_text_to_video_metrics run once more with
torch.argsort made stable (ties in index order), the rule nanoTVR takes (retrieval.py says why: the released
function orders tied videos as torch's unstable sort happens to, which depends on the row length and the
build). tests/test_metrics.py compares retrieval.retrieval_metrics with these. Nothing of CLIP4Clip is copied
here: this script only imports and calls it (its padding step is written here from the description above).

Regenerate (a few seconds on a CPU; any environment with torch and numpy):
    git clone https://github.com/ArrowLuo/CLIP4Clip /tmp/CLIP4Clip
    git -C /tmp/CLIP4Clip checkout 508ffa3de39ba0563a03199c440ab602a72e9b6f
    python tests/oracles/make_metrics_fixture.py --clip4clip /tmp/CLIP4Clip   # from the nanoTVR root
The matrices come from fixed seeds, so a regenerated file holds the same inputs. One output depends on the
torch build: `t2v` of "multi tied round(3x) 200x20", whose tied videos torch.argsort orders as its unstable
sort goes (torch 2.14.1: not in index order for rows of 20; the tests do not compare that number).
"""
import argparse
import functools
import importlib.util
import os
import subprocess

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "clip4clip_metrics.pt")
KEYS = ("R1", "R5", "R10", "MR", "MeanR")  # CLIP4Clip's names for R@1, R@5, R@10, MdR, MnR


def cases():
    """(name, sim [Nt, Nv] float32, caption_video [Nt]): random, tied (round(3x)), constant, uneven groups."""
    g = torch.Generator().manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g)
    out = [("single random 30x30", randn(30, 30), torch.arange(30)),
           ("single tied round(3x) 30x30", torch.round(3 * randn(30, 30)), torch.arange(30)),
           ("single tied round(x) 12x12", torch.round(randn(12, 12)), torch.arange(12)),
           ("single constant 8x8", torch.zeros(8, 8), torch.arange(8)),
           ("single even count, median between two ranks", torch.tensor([[1., 0.], [1., 0.]]), torch.arange(2))]
    ten = torch.arange(20).repeat_interleave(10)  # 20 videos x 10 captions, captions grouped by video
    out += [("multi random 200x20", randn(200, 20), ten),
            ("multi tied round(3x) 200x20", torch.round(3 * randn(200, 20)), ten),
            ("multi constant 200x20", torch.zeros(200, 20), ten)]
    counts = torch.randint(1, 6, (12,), generator=g)  # uneven groups: 1-5 captions per video
    uneven = torch.arange(12).repeat_interleave(counts)
    out += [("multi uneven random", randn(len(uneven), 12), uneven),
            ("multi uneven tied round(x)", torch.round(randn(len(uneven), 12)), uneven)]
    # 2 videos x 2 captions, t2v ranks 1, 1, 2, 2 (no ties): the median of an even count of ranks
    out += [("multi even count of ranks", torch.tensor([[.9, .1], [.8, .2], [.5, .4], [.6, .5]]),
             torch.tensor([0, 0, 1, 1]))]
    return [(n, s.float(), cv.long()) for n, s, cv in out]


def padded(sim, caption_video):
    """[Nt, Nv] -> [Nv, max captions, Nv]: video j's caption rows, in order, then -inf rows (eval_epoch's step)."""
    blocks = [sim[caption_video == j] for j in range(sim.shape[1])]
    width = max(len(b) for b in blocks)
    return np.stack([np.concatenate([b, np.full((width - len(b), sim.shape[1]), -np.inf, np.float32)])
                     for b in blocks])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clip4clip", required=True, help="a checkout of ArrowLuo/CLIP4Clip")
    p.add_argument("--out", default=OUT)
    a = p.parse_args()
    spec = importlib.util.spec_from_file_location("clip4clip_metrics", os.path.join(a.clip4clip, "metrics.py"))
    metrics = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(metrics)
    commit = subprocess.run(["git", "-C", a.clip4clip, "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    row = lambda m: torch.tensor([float(m[k]) for k in KEYS], dtype=torch.float64)
    records = []
    for name, sim, cv in cases():
        s, extra = sim.numpy(), {}
        if len(cv) == sim.shape[1]:  # one caption per video, caption i describes video i
            t2v, v2t = metrics.compute_metrics(s), metrics.compute_metrics(s.T)
        else:
            stacked = padded(s, cv.numpy())
            t2v = metrics.tensor_text_to_video_metrics(torch.from_numpy(stacked.copy()))
            v2t = metrics.compute_metrics(metrics.tensor_video_to_text_sim(torch.from_numpy(stacked.copy())).numpy())
            argsort, torch.argsort = torch.argsort, functools.partial(torch.argsort, stable=True)
            try:  # the same function with tied videos in index order
                extra = dict(t2v_stable=row(metrics.tensor_text_to_video_metrics(torch.from_numpy(stacked.copy()))))
            finally:
                torch.argsort = argsort
        records.append(dict(name=name, sim=sim, caption_video=cv, t2v=row(t2v), v2t=row(v2t), **extra))
        print(f"{name:48s} t2v {row(t2v).tolist()}  v2t {row(v2t).tolist()}  {extra}")
    torch.save(dict(cases=records, keys=list(KEYS), repo="ArrowLuo/CLIP4Clip", commit=commit,
                    torch=str(torch.__version__), numpy=np.__version__), a.out)
    print(f"wrote {a.out} ({os.path.getsize(a.out):,} bytes)")


if __name__ == "__main__":
    main()
