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
from messages import assert_tells

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest; `setup` is conftest's too


FLAG_ERRORS = [  # (flags, facts): the flag and value at fault, the fix's flag where there is one
    (["--max_frames", "0"], ["--max_frames 0"]),
    (["--batch_size", "0"], ["--batch_size 0"]),
    (["--batch_size", "6", "--gradient_accumulation_steps", "4"], ["--batch_size 6", "--gradient_accumulation_steps"]),
    (["--max_words", "2"], ["--max_words 2"]),
    (["--lr", "-0.001"], ["--lr -0.001"]),
    (["--lr", "nan"], ["--lr nan"]), (["--noclip_lr", "inf"], ["--lr inf"]),
    (["--clip_lr", "0"], ["--clip_lr 0.0"]),
    (["--epochs", "0"], ["--epochs 0"]),
    (["--warmup_proportion", "1.5"], ["--warmup_proportion 1.5"]),
    (["--save_every", "-1"], ["--save_every", "'-1'"]),
    (["--resume", "--overwrite"], ["--resume", "--overwrite"]),
    (["--checkpoint", __file__], ["--checkpoint", "--eval_only", "--init"]),
    (["--eval_only", "--checkpoint", "/no/such.pt"], ["--checkpoint /no/such.pt", "no such file"]),
    (["--num_frame", "3"], ["--num_frame 3"]),
]


@pytest.mark.parametrize("extra, facts", FLAG_ERRORS,
                         ids=[" ".join(extra).replace(__file__, "FILE") for extra, _ in FLAG_ERRORS])
def test_flag_errors(setup, tmp_path, extra, facts, capsys):
    assert_tells(error(capsys, flags(setup, tmp_path, *extra)), *facts)
    assert not tmp_path.exists() or not os.listdir(tmp_path)  # a failed start leaves no files


def test_checks_before_anything_slow(tmp_path, capsys, monkeypatch):
    """Method constraints are checked on a meta-device stand-in of the towers (named CLIP, tiny CLIP), and the
    data paths before any CLIP is loaded: no download, no synthetic set generated, no folder made."""
    monkeypatch.setattr(clip, "load", lambda *a, **k: pytest.fail("CLIP loaded before the checks"))
    monkeypatch.setattr(synthetic, "ensure_synthetic", lambda *a, **k: pytest.fail("synthetic set generated"))
    out = ["--output_dir", str(tmp_path / "out")]
    assert_tells(error(capsys, ["--method", "ump", "--data", "msrvtt", "--clip", "ViT-B/32", "--K_d", "13", *out]),
                 "K_d=13", "K_d <= 12")  # the value and its range on ViT-B/32's 12 video layers
    assert_tells(error(capsys, ["--method", "ump", "--K_d", "6", *out]), "K_d=6", "K_d <= 2")  # the tiny CLIP's 2
    assert_tells(error(capsys, ["--method", "dgl", "--eval_only", *out]), "--eval_only", "dgl", "--checkpoint")
    line = error(capsys, ["--method", "ump", "--data", "msrvtt", "--data_path", str(tmp_path / "none"), *out])
    assert_tells(line, "--data_path", tmp_path / "none")
    assert not (tmp_path / "out").exists()


def help_of(text, flag):
    """--help's text -> the entry of `flag`, unwrapped."""
    entry = re.search(rf"\n  {flag}\b.*?(?=\n  -|\Z)", text, re.S)
    assert entry, (flag, text)
    return " ".join(entry[0].split())


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
    ump, none = text["ump"], text["none"]
    for flag, default in (("--lr", "0.001"), ("--seed", "42"), ("--clip_lr", "none"), ("--K_d", "ump.py")):
        assert_tells(help_of(ump, flag), default)  # ump's defaults, and its own flags
    assert_tells(help_of(none, "--lr"), "--method")  # no method: where the defaults come from
    assert_tells(none, "--method M --help")


def test_aliases_and_idle_flag_warnings(tmp_path, capsys):
    args, cls, given = train.parse_args(["--method", "ump", "--num_frames", "3", "--num_epochs", "4", "--noclip_lr", "0.5"])
    assert (args.frames, args.epochs, args.lr) == (3, 4, 0.5) and {"frames", "epochs", "lr"} <= given
    said = []
    for argv in (["--method", "ump", "--clip_lr", "1e-3"], ["--method", "dgl", "--coef_lr", "1e-3"],
                 ["--method", "full", "--lr", "1e-3"], ["--method", "simvtp", "--clip", "ViT-B/32"]):
        methods.probe(*train.parse_args(argv), said.append)  # warns of argv[2] (idle for argv[1])
        assert said[-1].startswith("WARNING: ")
        assert_tells(said[-1], argv[2], "--method " + argv[1])
    methods.probe(*train.parse_args(["--method", "full", "--clip_lr", "1e-3"]), said.append)
    assert len(said) == 4  # --clip_lr means something for full
