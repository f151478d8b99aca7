"""--precision on the CPU (what CI can run of the GPU's mixed-precision path): every method, and SimVTP's
pretraining, trains a step under bf16 and fp16 autocast (fp16 with torch.amp.GradScaler("cpu")); logits stay fp32
under any autocast; a run resumes in another precision."""
import json
import os

import pytest
import torch

import meanp
import retrieval
import train
from conftest import make_tiny_clip

pytestmark = pytest.mark.usefixtures("one_thread")
METHODS = [("full", ["--clip_lr", "1e-4"]), ("ump", []), ("dgl", []), ("adapter", []), ("unipt", []),
           ("simvtp", []), ("simvtp", ["--stage", "pretrain"])]


def run(setup, out, method, *extra):
    argv = ["--method", method, "--data_path", str(setup / "synthetic"), "--output_dir", str(out),
            "--num_workers", "0", "--max_frames", "2", "--batch_size", "8", "--max_words", "16", "--log_every", "1",
            *extra]
    if method != "simvtp":
        argv += ["--clip", str(setup / "clip.pt")]
    train.main(argv)
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method, extra", METHODS, ids=[m + " ".join(e[:2]) for m, e in METHODS])
def test_every_method_trains_under_mixed_precision(setup, tmp_path, method, extra, precision, capsys):
    rows = run(setup, tmp_path, method, "--precision", precision, "--max_steps", "2", *extra)
    assert f"autocast {dict(bf16=torch.bfloat16, fp16=torch.float16)[precision]}" in capsys.readouterr().out
    steps = [r for r in rows if r.get("event") == "train"]
    assert [r["step"] for r in steps] == [1, 2] and all(0 < r["loss"] < 100 for r in steps)
    assert ("skipped_steps" in steps[-1]) == (precision == "fp16")  # fp16 says how many steps its scaler skipped
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 2 and all(t.dtype == torch.float32 for t in ck["model"].values())  # fp32 masters


def test_resume_in_another_precision(setup, tmp_path):
    run(setup, tmp_path, "full", "--clip_lr", "1e-4", "--max_steps", "1")  # fp32: an empty scaler state
    rows = run(setup, tmp_path, "full", "--clip_lr", "1e-4", "--max_steps", "2", "--resume", "--precision", "fp16")
    assert [r["step"] for r in rows if r.get("event") == "train"] == [1, 2]
    run(setup, tmp_path, "full", "--clip_lr", "1e-4", "--max_steps", "3", "--resume", "--precision", "bf16")
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_logits_are_fp32_under_autocast(dtype):
    method = meanp.MeanP(make_tiny_clip(), 2)
    method.logit_scale.data.fill_(4.6)  # exp = 99.5: confident logits, where bf16 rounds by ~0.4
    text, video = torch.randn(5, 32), torch.randn(5, 32)
    ref = retrieval.similarity(method, text, video, None)
    with torch.autocast("cpu", dtype=dtype):
        low = retrieval.similarity(method, text, video, None)
    assert low.dtype == torch.float32 and torch.equal(low, ref)
