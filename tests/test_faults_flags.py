"""Flags checked before anything slow, one `error:` line each (docs/faults.md), and the --help / alias / warning
side of the flags."""
import os
import re

import pytest

import clip
import methods
import synthetic
import train
from fault_runs import error, flags

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest; `setup` is conftest's too


@pytest.mark.parametrize("extra, message", [
    (["--max_frames", "0"], "--max_frames 0: a clip needs at least 1 frame"),
    (["--batch_size", "0"], "--batch_size 0: >= 1"),
    (["--batch_size", "6", "--gradient_accumulation_steps", "4"], "divisible by ranks x --gradient_accumulation_steps"),
    (["--max_words", "2"], "--max_words 2: [SOT] and [EOT] take 2 tokens"),
    (["--lr", "-0.001"], "--lr -0.001: a learning rate is positive and finite"),
    (["--lr", "nan"], "--lr nan"), (["--noclip_lr", "inf"], "--lr inf"),
    (["--clip_lr", "0"], "--clip_lr 0.0: positive"),
    (["--epochs", "0"], "--epochs 0: train at least 1 epoch"),
    (["--warmup_proportion", "1.5"], "--warmup_proportion 1.5"),
    (["--save_every", "-1"], "argument --save_every: invalid save_interval value: '-1'"),
    (["--resume", "--overwrite"], "--resume continues the run in --output_dir, --overwrite replaces it"),
    (["--checkpoint", __file__], "--checkpoint is what --eval_only evaluates"),
    (["--eval_only", "--checkpoint", "/no/such.pt"], "--checkpoint /no/such.pt: no such file"),
    (["--num_frame", "3"], "unrecognized arguments: --num_frame 3"),
])
def test_flag_errors(setup, tmp_path, extra, message, capsys):
    assert message in error(capsys, flags(setup, tmp_path, *extra))
    assert not tmp_path.exists() or not os.listdir(tmp_path)  # a failed start leaves no files


def test_checks_before_anything_slow(tmp_path, capsys, monkeypatch):
    """Method constraints are checked on a meta-device stand-in of the towers (named CLIP, tiny CLIP), and the
    data paths before any CLIP is loaded: no download, no synthetic set generated, no folder made."""
    monkeypatch.setattr(clip, "load", lambda *a, **k: pytest.fail("CLIP loaded before the checks"))
    monkeypatch.setattr(synthetic, "ensure_synthetic", lambda *a, **k: pytest.fail("synthetic set generated"))
    out = ["--output_dir", str(tmp_path / "out")]
    assert "K_d=13: STS runs in the last K_d of the 12 video layers" in error(
        capsys, ["--method", "ump", "--data", "msrvtt", "--clip", "ViT-B/32", "--K_d", "13", *out])
    assert "K_d=6: STS runs in the last K_d of the 2 video layers" in error(capsys, ["--method", "ump", "--K_d", "6", *out])
    assert "--eval_only would evaluate an untrained dgl: pass --checkpoint" in error(
        capsys, ["--method", "dgl", "--eval_only", *out])
    line = error(capsys, ["--method", "ump", "--data", "msrvtt", "--data_path", str(tmp_path / "none"), *out])
    assert "not found in --data_path" in line
    assert not (tmp_path / "out").exists()


def test_help_shows_every_flag_and_the_methods_defaults(capsys):
    text = {}
    for name, argv in (("ump", ["--method", "ump", "--help"]), ("none", ["--help"])):
        with pytest.raises(SystemExit) as e:
            train.parse_args(argv)
        assert e.value.code == 0
        text[name] = capsys.readouterr().out
        assert "None" not in text[name]
        for flag in ("--seed", "--num_workers", "--batch_size_val", "--log_every", "--device", "--save_every",
                     "--lr", "--clip_lr", "--max_frames", "--output_dir", "--resume", "--overwrite"):
            assert re.search(rf"\n  {flag}[^\n]*(\n {{20,}}|  )\S", text[name]), (name, flag)  # a help text follows
    ump, none = (" ".join(text[k].split()) for k in ("ump", "none"))  # unwrapped
    assert "new (non-CLIP) parameters (default 0.001)" in ump and "dropout (default 42)" in ump and "--K_d K_D" in ump
    assert "of trainable CLIP parameters (default none: no CLIP weight trains)" in ump
    assert "(default: set by --method)" in none and "shows M's defaults" in none


def test_aliases_and_idle_flag_warnings(tmp_path, capsys):
    args, cls, given = train.parse_args(["--method", "ump", "--num_frames", "3", "--num_epochs", "4", "--noclip_lr", "0.5"])
    assert (args.frames, args.epochs, args.lr) == (3, 4, 0.5) and {"frames", "epochs", "lr"} <= given
    said = []
    for argv, warning in ((["--method", "ump", "--clip_lr", "1e-3"], "--clip_lr has no effect for --method ump: no CLIP"),
                          (["--method", "dgl", "--coef_lr", "1e-3"], "--coef_lr has no effect for --method dgl"),
                          (["--method", "full", "--lr", "1e-3"], "--lr has no effect for --method full: every trainable"),
                          (["--method", "simvtp", "--clip", "ViT-B/32"], "--clip has no effect for --method simvtp")):
        methods.probe(*train.parse_args(argv), said.append)
        assert warning in said[-1] and said[-1].startswith("WARNING: ")
    methods.probe(*train.parse_args(["--method", "full", "--clip_lr", "1e-3"]), said.append)
    assert len(said) == 4  # --clip_lr means something for full
