"""The command line (clipforget_fast/cli.py): forget → info → apply on the proving ground through both
of its loaders, a second request on the merged weights, a Hugging Face folder, and bad input (exit
status 2, a message naming it, no file written).

open_clip (hence the proving ground) is imported inside the tests: importing it imports Triton, which
test_kernels.py must be the first to do.
"""
import json
import subprocess
import sys

import pytest
import torch

from clipforget_fast import Patch
from clipforget_fast.cli import main

VOCAB = ["--classes", "fish,house,star,crescent_moon", "--domains", "photo,sketch"]
FAST = ["--set", "prototypes_per_cell=0"]     # the global class redirect needs no prototypes


def run(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) == 0
    return capsys.readouterr().out


def fails(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def pg():
    from clipforget_fast import proving_ground

    return proving_ground


@pytest.fixture(scope="module")
def base(pg):
    model, _, _ = pg.load()
    return model


def test_forget_info_apply_and_reload(capsys, tmp_path, pg, base):
    p = tmp_path / "fish.safetensors"
    run(capsys, "forget", "--model", "proving-ground", *VOCAB, "--forget-classes", "fish", *FAST, "--out", p)
    patch = Patch.load(p)
    assert patch.spec["mode"] == "global" and patch.info["edit"] == "class-redirect"
    assert sorted(map(tuple, patch.spec["forget_cells"])) == [("fish", "photo"), ("fish", "sketch")]
    info = json.loads(run(capsys, "info", p, "--json"))
    assert info["mode"] == "global" and info["config_changed"] == {"prototypes_per_cell": 0}
    assert [(e["name"], e["rank"]) for e in info["entries"]] == [(e.name, e.rank) for e in patch.entries]
    assert "text_projection" in run(capsys, "info", p)

    merged = tmp_path / "merged.safetensors"
    run(capsys, "apply", "--model", "proving-ground", "--patch", p, "--out", merged)
    edited, _, _ = pg.load(weights=merged)
    with patch.applied(base):
        want = dict(base.named_parameters())
        for name, w in edited.named_parameters():
            assert torch.equal(w, want[name]), name
    assert not torch.equal(edited.text_projection, base.text_projection)


def test_open_clip_loader_and_a_second_request_on_the_merged_weights(capsys, tmp_path, pg, base):
    from clipforget_fast.proving_ground.model import CONFIG_PATH, WEIGHTS_PATH

    oc = ["--model", "ProvingGround-ViT-48", "--model-config", CONFIG_PATH]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"classes": ["fish", "house", "star", "crescent_moon"], "domains": ["photo", "sketch"],
                                "forget_classes": ["house"]}))
    p1, m1 = tmp_path / "house.safetensors", tmp_path / "m1.safetensors"
    run(capsys, "forget", *oc, "--checkpoint", WEIGHTS_PATH, "--spec", spec, *FAST, "--out", p1)
    run(capsys, "apply", *oc, "--checkpoint", WEIGHTS_PATH, "--patch", p1, "--out", m1)
    # the second request is computed on the merged weights, and applies to them only
    p2, m2 = tmp_path / "star.safetensors", tmp_path / "m2.safetensors"
    run(capsys, "forget", *oc, "--checkpoint", m1, *VOCAB, "--forget-classes", "star", *FAST, "--out", p2)
    err = fails(capsys, "apply", *oc, "--checkpoint", WEIGHTS_PATH, "--patch", p2, "--out", m2)
    assert "hash mismatch" in err and "--force" in err and not m2.exists()
    run(capsys, "apply", *oc, "--checkpoint", m1, "--patch", p2, "--out", m2)
    # both patches, in order, on the base model give the twice-merged weights
    edited, _, _ = pg.load(weights=m2)
    first, second = Patch.load(p1), Patch.load(p2)
    with first.applied(base), second.applied(base):
        assert torch.equal(edited.text_projection, base.text_projection)


def test_bad_input_is_named_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "p.safetensors"
    pgm = ["--model", "proving-ground"]
    cases = [
        ([*pgm, *VOCAB, "--forget-classes", "dragon"], "unknown class 'dragon'"),
        ([*pgm, *VOCAB, "--forget-domains", "oil"], "unknown domain 'oil'"),
        ([*pgm, *VOCAB, "--forget-classes", "fish", "--set", "alpha=2"], "ForgetConfig.alpha=2"),
        ([*pgm, *VOCAB, "--forget-classes", "fish", "--set", "colour=1"], "unknown fields ['colour']"),
        ([*pgm, *VOCAB, "--forget-classes", "fish", "--set", "alpha"], "expected field=value"),
        ([*pgm, "--domains", "photo", "--forget-classes", "fish"], "give --classes and --domains"),
        ([*pgm, "--classes", ",", "--domains", "photo", "--forget-classes", "fish"], "--classes: no names"),
        ([*pgm, "--classes", "@" + str(tmp_path / "none.txt"), "--domains", "photo"], "none.txt"),
        (["--model", "ViT-B-32", *VOCAB, "--forget-classes", "fish"], "--checkpoint FILE"),
        (["--model", "ViT-Q-99", *VOCAB, "--forget-classes", "fish"], "unknown open_clip architecture 'ViT-Q-99'"),
        ([*pgm, "--hf", str(tmp_path), *VOCAB, "--forget-classes", "fish"], "exactly one of --model"),
        ([*pgm, "--checkpoint", str(tmp_path / "w.safetensors"), *VOCAB, "--forget-classes", "fish"],
         "--checkpoint: no file"),
    ]
    for argv, msg in cases:
        err = fails(capsys, "forget", *argv, "--out", out)
        assert msg in err, (argv, err)
    assert "must end in .safetensors" in fails(capsys, "forget", *pgm, *VOCAB, "--forget-classes", "fish",
                                               "--out", tmp_path / "p.pt")
    assert "does not exist" in fails(capsys, "forget", *pgm, *VOCAB, "--forget-classes", "fish",
                                     "--out", tmp_path / "no" / "p.safetensors")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"classes": ["fish"], "domains": ["photo"], "forget_class": ["fish"]}))
    assert "unknown keys ['forget_class']" in fails(capsys, "forget", *pgm, "--spec", spec, "--out", out)
    spec.write_text(json.dumps({"classes": "fish", "domains": ["photo"]}))
    assert "classes must be a list of names" in fails(capsys, "forget", *pgm, "--spec", spec, "--out", out)
    assert "not both" in fails(capsys, "forget", *pgm, "--spec", spec, *VOCAB, "--out", out)
    assert "not a clipforget patch" in fails(capsys, "info", _not_a_patch(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["np.safetensors", "spec.json"]


def _not_a_patch(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "np.safetensors"
    save_file({"x": torch.zeros(2)}, str(f))
    return f


def test_hugging_face_folder(capsys, tmp_path):
    transformers = pytest.importorskip("transformers")
    from conftest import make_tiny_clip
    from test_hf import hf_tokenizer, to_hf

    hf = to_hf(make_tiny_clip())
    src = tmp_path / "hf"
    hf.save_pretrained(str(src))
    hf_tokenizer().save_pretrained(str(src))
    p, out = tmp_path / "p.safetensors", tmp_path / "edited"
    run(capsys, "forget", "--hf", src, "--classes", "dog,cat,car,tree", "--domains", "photo,sketch",
        "--forget-classes", "dog", *FAST, "--out", p)
    patch = Patch.load(p)
    assert [e.name for e in patch.entries] == ["text_projection.weight"]
    run(capsys, "apply", "--hf", src, "--patch", p, "--out", out)
    assert "exists" in fails(capsys, "apply", "--hf", src, "--patch", p, "--out", out)
    edited = transformers.CLIPModel.from_pretrained(str(out), local_files_only=True)
    with patch.applied(hf):
        for (name, w), (_, want) in zip(edited.named_parameters(), hf.named_parameters()):
            assert torch.equal(w, want), name
    assert transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)("a dog")["input_ids"]


def test_module_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "clipforget_fast", "info", str(tmp_path / "none.safetensors")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no patch file at" in r.stderr
