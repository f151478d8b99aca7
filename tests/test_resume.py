"""Exact resume for every method and baseline: a run cut at a mid-epoch checkpoint, resumed, cut again at an
epoch-end checkpoint and resumed to its end equals the uninterrupted run bit for bit (trainable weights,
optimizer state, every logged loss and metric), with and without DataLoader worker processes."""
import json

import pytest
import torch

import train

# name -> flags; 2 epochs x 3 steps of 24 pairs, 2 frames: seconds per run
CONFIGS = {"ump": ["--method", "ump"], "dgl-linear": ["--method", "dgl", "--latent", "linear"],
           "dgl-transformer": ["--method", "dgl", "--latent", "transformer"], "adapter": ["--method", "adapter"],
           "unipt": ["--method", "unipt"], "simvtp": ["--method", "simvtp"],
           "simvtp-pretrain": ["--method", "simvtp", "--stage", "pretrain"], "full": ["--method", "full"]}
TIMING = {"step_time", "clips_per_s", "data_wait", "time"}  # wall-clock fields, the only ones that may differ


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest; `setup` is conftest's too


def run(setup, out, config, workers, *extra):
    clip_flag = [] if config.startswith("simvtp") else ["--clip", str(setup / "clip.pt")]
    return train.main(CONFIGS[config] + clip_flag + [
        "--data_path", str(setup / "synthetic"), "--output_dir", str(out), "--num_workers", str(workers),
        "--max_frames", "2", "--batch_size", "24", "--epochs", "2", "--log_every", "3", "--save_every", "0", *extra])


def rows(out):
    """log.jsonl's train and eval rows without their wall-clock fields."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in map(json.loads, open(out / "log.jsonl"))
            if r["event"] in ("train", "eval")]


def assert_same(a, b, where=""):
    """Equal to the bit: tensors with torch.equal, containers element by element."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("config", CONFIGS)
def test_resume_is_exact(setup, tmp_path, config):
    # half the methods train uninterrupted in the main process and resume with workers, half the other way round
    whole, cut = (0, 2) if list(CONFIGS).index(config) % 2 == 0 else (2, 0)
    run(setup, tmp_path / "whole", config, whole)
    run(setup, tmp_path / "cut", config, cut, "--max_steps", "2")  # 2 of epoch 1's 3 steps, between log rows
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert (ck["step"], ck["epoch"], ck["batch"], len(ck["window"])) == (2, 0, 2, 1)
    run(setup, tmp_path / "cut", config, cut, "--resume", "--max_steps", "3")  # from mid-epoch to epoch 1's end
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert (ck["step"], ck["epoch"], ck["batch"]) == (3, 1, 0)
    run(setup, tmp_path / "cut", config, whole, "--resume")  # from the epoch-end checkpoint to the end
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("whole", "cut"))
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"]) == (6, 2)
    assert_same(a["model"], b["model"], "model")
    assert_same(a["optimizer"], b["optimizer"], "optimizer")
    assert_same(rows(tmp_path / "whole"), rows(tmp_path / "cut"), "log")  # losses and metrics, no row twice
    moved = ck["model"]  # the comparison is about weights that really change between the checkpoints
    assert any(not torch.equal(moved[n], b["model"][n]) for n in moved)
    events = [json.loads(r)["event"] for r in open(tmp_path / "cut" / "log.jsonl")]
    assert events.count("start") == 1 and events.count("resume") == 2
    assert (events.count("eval") == 2) == (config != "simvtp-pretrain")
