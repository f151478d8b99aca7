"""train.py end to end on a tiny synthetic set and a tiny CLIP: a subprocess run, eval-only, a checkpoint write
killed half-way, the method contract's flags, and the clear errors (exact resume: test_resume.py; every other
fault: test_faults_*.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import meanp
import methods
import train
from conftest import make_tiny_clip
from messages import one_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest; `setup` is conftest's too


def flags(setup, out, *extra):
    return ["--method", "full", "--data_path", str(setup / "synthetic"), "--clip", str(setup / "clip.pt"),
            "--output_dir", str(out), "--num_workers", "0", "--max_frames", "4", "--batch_size", "8",
            "--epochs", "2", "--clip_lr", "1e-3", *extra]


def weights(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)


def test_subprocess_run_logs_checkpoints_and_evaluates(setup, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "train.py", *flags(setup, tmp_path, "--epochs", "1", "--dsl")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trainable of" in r.stdout and "final" in r.stdout and "DSL t2v" in r.stdout
    rows = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    train_rows = [x for x in rows if x["event"] == "train"]
    assert train_rows and {"loss", "lr", "step_time", "clips_per_s", "data_wait"} <= set(train_rows[0])
    evals = [x for x in rows if x["event"] == "eval"]
    assert len(evals) == 1 and 0 <= evals[0]["t2v"]["R@1"] <= 100 and "DSL v2t" in evals[0]
    ck = weights(tmp_path)  # a plain dict that loads with weights_only=True
    assert ck["step"] == 9 and ck["epoch"] == 1 and ck["batch"] == 0 and ck["args"]["method"] == "full"
    frozen = {"token_embedding.weight", "positional_embedding", "visual.class_embedding", "visual.positional_embedding",
              "visual.conv1.weight", "visual.ln_pre.weight", "visual.ln_pre.bias"}  # CLIP4Clip's --freeze_layer_num 0
    assert set(ck["model"]) == {"clip." + n for n, _ in make_tiny_clip().named_parameters() if n not in frozen}
    # --eval_only on the checkpoint reproduces the epoch's metrics
    again = train.main(flags(setup, tmp_path / "eval", "--eval_only", "--checkpoint", str(tmp_path / "checkpoint.pt")))
    assert again["t2v"] == pytest.approx(evals[0]["t2v"]) and again["v2t"] == pytest.approx(evals[0]["v2t"])


def test_training_moves_weights_and_clamps_logit_scale(setup, tmp_path):
    train.main(flags(setup, tmp_path, "--epochs", "1", "--clip_lr", "1.0"))  # absurd lr: clamp must hold
    ck = weights(tmp_path)
    start = make_tiny_clip().state_dict()
    assert ck["model"]["clip.logit_scale"].item() <= torch.log(torch.tensor(100.0)).item() + 1e-6
    name = "visual.transformer.resblocks.0.attn.in_proj_weight"
    assert not torch.equal(ck["model"]["clip." + name], start[name])


def test_killed_checkpoint_write_keeps_previous(setup, tmp_path, monkeypatch):
    train.main(flags(setup, tmp_path, "--epochs", "1"))
    before = weights(tmp_path)

    def dying_save(obj, f, *a, **k):  # writes half a file, then the process "dies"
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train.main(flags(setup, tmp_path, "--epochs", "2", "--resume"))
    after = weights(tmp_path)  # the previous checkpoint is still there and whole
    assert after["step"] == before["step"] == 9
    for name in before["model"]:
        assert torch.equal(after["model"][name], before["model"][name])
    assert [f for f in os.listdir(tmp_path) if ".tmp" in f] == []


def test_method_contract_flags(setup, tmp_path, monkeypatch):
    """RECIPE keys beyond the standard ones become typed flags and constructor arguments; DATASET_RECIPES
    overrides RECIPE, the command line overrides both."""
    built = {}

    class Toy(meanp.MeanP):
        def __init__(self, clip_model, num_frames, *, depth=2, rate=0.5, tag="x", gate=True):
            super().__init__(clip_model, num_frames, train_clip=False)
            self.head = torch.nn.Linear(1, 1)  # something trains
            built.update(num_frames=num_frames, depth=depth, rate=rate, tag=tag, gate=gate)

        def param_groups(self, weight_decay):
            return [dict(params=list(self.head.parameters()), weight_decay=weight_decay)]

        def encode_text(self, text):
            return super().encode_text(text) * self.head.weight

    recipe = dict(lr=1e-3, clip_lr=None, epochs=1, batch_size=8, frames=6, words=16, weight_decay=0.0, warmup=0.1,
                  grad_clip=1.0, depth=2, rate=0.5, tag="x", gate=True)
    monkeypatch.setitem(methods.METHODS, "toy", (Toy, recipe, dict(synthetic=dict(frames=3, rate=0.25))))
    args, cls, _ = train.parse_args(["--method", "toy", "--depth", "5", "--gate", "false", "--tag", "y"])
    assert cls is Toy and args.frames == 3 and args.words == 16 and args.lr == 1e-3
    assert args.kwargs == dict(depth=5, rate=0.25, tag="y", gate=False)
    with pytest.raises(SystemExit):
        train.parse_args(["--method", "toy", "--gate", "maybe"])
    argv = flags(setup, tmp_path, "--epochs", "1")
    argv[argv.index("full")] = "toy"
    train.main(argv + ["--depth", "3"])
    assert built == dict(num_frames=4, depth=3, rate=0.25, tag="x", gate=True)
    assert set(weights(tmp_path)["model"]) == {"head.weight", "head.bias"}


@pytest.mark.parametrize("argv, facts", [  # the flag and value at fault, and what to choose from
    (["--method", "nope"], ["--method", "'nope'", *methods.METHODS]),
    (["--method", "full", "--data", "nope"], ["--data", "'nope'", *data.DATASETS]),
    (["--method", "full", "--eval_only", "--checkpoint", "/no/such.pt"], ["--checkpoint /no/such.pt", "no such file"]),
], ids=["method", "data", "checkpoint"])
def test_clear_errors(argv, facts, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(argv)
    assert e.value.code == 2
    one_error(capsys.readouterr().err, *facts)
