"""The command line (clipforget_fast/cli.py): forget → info → apply on the proving ground through both
of its loaders, a second request on the merged weights, evaluate on a folder of rendered PNGs against
the library's evaluate, a Hugging Face folder, and bad input (exit status 2, a message naming it, no
file written).
"""
import copy
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from clipforget_fast import ForgetConfig, ForgetSpec, Patch, forget, read_images
from clipforget_fast import proving_ground as pg
from clipforget_fast.cli import config_changed, domain_folder, main
from clipforget_fast.proving_ground.model import CONFIG_PATH, WEIGHTS_PATH

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
def base():
    model, _, _ = pg.load()
    return model


def test_forget_info_apply_and_reload(capsys, tmp_path, base):
    p = tmp_path / "fish.safetensors"
    run(capsys, "forget", "--model", "proving-ground", *VOCAB, "--forget-classes", "fish", *FAST, "--out", p)
    patch = Patch.load(p)
    assert patch.spec["mode"] == "global" and patch.info["edit"] == "class-redirect"
    assert sorted(map(tuple, patch.spec["forget_cells"])) == [("fish", "photo"), ("fish", "sketch")]
    info = json.loads(run(capsys, "info", p, "--json"))
    assert info["mode"] == "global" and info["config_changed"] == {"prototypes_per_cell": 0}
    for energy, shown in ((0.9999, False), (0.99, True)):     # the class redirect's resolved default
        older = Patch(patch.entries, patch.spec, {**patch.config, "retain_energy": energy}, patch.info)
        assert config_changed(older) == ({"prototypes_per_cell": 0, "retain_energy": energy} if shown
                                         else {"prototypes_per_cell": 0})
    assert [(e["name"], e["rank"]) for e in info["entries"]] == [(e.name, e.rank) for e in patch.entries]
    assert "text_projection" in run(capsys, "info", p)

    merged = tmp_path / "merged.safetensors"
    run(capsys, "apply", "--model", "proving-ground", "--patch", p, "--out", merged)
    umask = os.umask(0)
    os.umask(umask)
    assert merged.stat().st_mode & 0o777 == p.stat().st_mode & 0o777 == 0o666 & ~umask
    edited, _, _ = pg.load(weights=merged)
    with patch.applied(base):
        want = dict(base.named_parameters())
        for name, w in edited.named_parameters():
            assert torch.equal(w, want[name]), name
    assert not torch.equal(edited.text_projection, base.text_projection)

    # the pooling survives the merge: the shipped class-token one, and an average-pooled checkpoint's
    from safetensors.torch import load_file, save_file
    avg, merged_avg = tmp_path / "avg.safetensors", tmp_path / "merged_avg.safetensors"
    save_file(load_file(str(WEIGHTS_PATH)), str(avg), metadata={"pool_type": "avg"})
    run(capsys, "apply", "--model", "proving-ground", "--checkpoint", avg, "--patch", p, "--out", merged_avg)
    assert pg.load(weights=merged_avg)[0].visual.pool_type == "avg"
    assert pg.load(weights=merged)[0].visual.pool_type == "tok"


def test_the_proving_ground_brings_its_vocabulary(capsys, tmp_path):
    """On the proving ground a request without --classes / --domains takes its 20 classes and 5 domains;
    one of them given replaces only that list."""
    p = tmp_path / "fish.safetensors"
    run(capsys, "forget", "--model", "proving-ground", "--forget-classes", "fish", *FAST, "--out", p)
    spec = Patch.load(p).spec
    assert spec["classes"] == list(pg.CLASSES) and spec["domains"] == list(pg.DOMAINS)
    assert sorted(map(tuple, spec["forget_cells"])) == sorted(("fish", d) for d in pg.DOMAINS)
    run(capsys, "forget", "--model", "proving-ground", "--domains", "photo,sketch", "--forget-classes", "fish", *FAST,
        "--out", p)
    spec = Patch.load(p).spec
    assert spec["classes"] == list(pg.CLASSES) and spec["domains"] == ["photo", "sketch"]


def test_open_clip_loader_and_a_second_request_on_the_merged_weights(capsys, tmp_path, base):
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
    m3 = tmp_path / "m3.safetensors"                     # the flag repeated adds the files, in order
    run(capsys, "apply", *oc, "--checkpoint", WEIGHTS_PATH, "--patch", p1, "--patch", p2, "--out", m3)
    assert torch.equal(pg.load(weights=m3)[0].text_projection, edited.text_projection)


def test_evaluate_on_an_image_folder(capsys, tmp_path, base):
    from PIL import Image

    from clipforget_fast import evaluate

    classes, domains = ["fish", "house", "star", "crescent_moon"], ["photo", "sketch"]
    raw, ci, di, _ = pg.render_raw(classes, domains, 3, seed=2_000_003)
    root = tmp_path / "images"
    for k, (img, c, d) in enumerate(zip(raw, ci, di)):
        f = root / domains[d] / classes[c] / f"{k:03d}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(f)
    p = tmp_path / "fish.safetensors"
    run(capsys, "forget", "--model", "proving-ground", *VOCAB, "--forget-classes", "fish", *FAST, "--out", p)
    got = json.loads(run(capsys, "evaluate", "--model", "proving-ground", "--images", root, "--patch", p, "--json"))
    # the library on the same renders (normalized without the PNG round trip and the loader's preprocess)
    images, ci, di = pg.render(classes, domains, 3, seed=2_000_003)
    before = evaluate(base, pg.get_tokenizer(), images, ci, di, classes, domains)
    with Patch.load(p).applied(base):
        after = evaluate(base, pg.get_tokenizer(), images, ci, di, classes, domains)
    assert got["classes"] == classes and got["images"] == len(ci)
    assert got["before"] == before.accuracy.tolist() and got["after"] == after.accuracy.tolist()
    assert got["forgotten"]["after"] == 0.0 and got["kept"]["after"] == after.cell_mean(
        [(c, d) for c in classes[1:] for d in domains])
    # a patch that does not apply where it stands in the list is named, as apply names it
    again = tmp_path / "fish_again.safetensors"
    again.write_bytes(p.read_bytes())
    err = fails(capsys, "evaluate", "--model", "proving-ground", "--images", root, "--patch", p, again)
    assert "--patch " + str(again) in err and "hash mismatch" in err and "--force" in err
    err = fails(capsys, "evaluate", "--model", "proving-ground", "--images", root, "--patch", p, "--patch", again)
    assert "--patch " + str(again) in err and "hash mismatch" in err      # a repeated flag adds, as apply's does
    # without a patch the vocabulary is the folders' (sorted), and a cell can be left out
    (root / "photo" / "fish").rename(tmp_path / "fish_photo")
    got = json.loads(run(capsys, "evaluate", "--model", "proving-ground", "--images", root, "--json"))
    assert got["classes"] == sorted(classes) and got["before"][sorted(classes).index("fish")][0] is None
    (root / "sketch" / "fish").rename(tmp_path / "fish_sketch")          # nothing left of what p forgets
    out = run(capsys, "evaluate", "--model", "proving-ground", "--images", root, "--patch", p)
    assert "forgotten cells: no images" in out and "kept cells: 100.0% → 100.0%" in out
    assert "folders outside the vocabulary" in fails(capsys, "evaluate", "--model", "proving-ground", "--images",
                                                     root, "--classes", "fish,house", "--domains", "photo,sketch")
    (root / "sketch" / "star" / "000.png").write_bytes(b"not an image")
    err = fails(capsys, "evaluate", "--model", "proving-ground", "--images", root)
    assert "cannot read" in err and "000.png" in err
    assert "no images under" in fails(capsys, "evaluate", "--model", "proving-ground", "--images", tmp_path / "fish_photo")


def test_prototype_bank_made_once_and_reused(capsys, tmp_path):
    bank, p = tmp_path / "bank.safetensors", tmp_path / "p.safetensors"
    small = ["--set", "prototypes_per_cell=2", "--set", "steps=10"]
    assert "8 cells" in run(capsys, "prototypes", "--model", "proving-ground", *VOCAB, *small, "--out", bank)
    request = ["--model", "proving-ground", *VOCAB, "--forget-classes", "house", "--forget-domains", "sketch", *small]
    run(capsys, "forget", *request, "--prototypes", bank, "--out", p)
    patch = Patch.load(p)
    assert patch.info["synthesis"] == {"reused_cells": 8} and "synthesis" not in patch.timings
    # a bank lacking cells: the missing ones are synthesized
    other = ["--classes", "fish,house,star,key", "--domains", "photo,sketch"]
    run(capsys, "forget", "--model", "proving-ground", *other, "--forget-classes", "house", "--forget-domains",
        "sketch", *small, "--prototypes", bank, "--out", p)
    assert Patch.load(p).info["synthesis"]["reused_cells"] == 6
    assert "--prototypes: no file at" in fails(capsys, "forget", *request, "--prototypes", tmp_path / "none.safetensors",
                                           "--out", p)


def test_forget_with_domain_examples_from_a_folder(capsys, tmp_path):
    from PIL import Image

    classes, domains = ["fish", "house", "star", "crescent_moon"], ["photo", "sketch"]
    raw, ci, di, _ = pg.render_raw(classes, domains, 2, seed=5_000_003)
    root = tmp_path / "examples"
    for k, (img, c, d) in enumerate(zip(raw, ci, di)):     # any layout under <domain>/: here by class
        f = root / domains[d] / classes[c] / f"{k:03d}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(f)
    Image.fromarray(raw[0]).save(root / "sketch" / "loose.png")
    p = tmp_path / "p.safetensors"
    request = ["--model", "proving-ground", *VOCAB, "--forget-classes", "house", "--forget-domains", "sketch",
               "--set", "prototypes_per_cell=2", "--set", "steps=10", "--set", "gate_translate_steps=0"]
    run(capsys, "forget", *request, "--domain-examples", root, "--out", p)
    patch = Patch.load(p)
    assert patch.info["gate"]["examples"] == {"photo": 8, "sketch": 9}
    # the command decodes the files a batch at a time (ImageFiles): the patch is the library's on the
    # same images held as tensors
    model, tokenizer, preprocess = pg.load()
    held = {d: read_images(fs, preprocess) for d, fs in domain_folder(root, domains).items()}
    same = forget(model, tokenizer, ForgetSpec.from_dict(patch.spec), ForgetConfig.from_dict(patch.config),
                  domain_examples=held)
    assert all(torch.equal(a.A, b.A) and torch.equal(a.B, b.B) for a, b in zip(patch.entries, same.entries, strict=True))
    changed = {"prototypes_per_cell": 2, "steps": 10, "gate_translate_steps": 0}
    assert json.loads(run(capsys, "info", p, "--json"))["config_changed"] == changed
    # a patch that records the order its None resolved to (as older patches do) kept the default; another
    # order is a change, and without examples 10,000 is one too
    for order, examples, shown in ((10000.0, True, False), (5.0, True, True), (10000.0, False, True),
                                   (100.0, False, False)):
        info = copy.deepcopy(patch.info)
        if not examples:
            del info["gate"]["examples"]
        older = Patch(patch.entries, patch.spec, {**patch.config, "gate_keep_order": order}, info)
        assert config_changed(older) == ({**changed, "gate_keep_order": order} if shown else changed)
    p.unlink()
    (root / "oil").mkdir()
    assert "folder 'oil' is not one of the request's domains" in fails(capsys, "forget", *request, "--domain-examples",
                                                                        root, "--out", p)
    (root / "oil").rmdir()
    assert "no folder at" in fails(capsys, "forget", *request, "--domain-examples", tmp_path / "none", "--out", p)
    (tmp_path / "empty" / "photo").mkdir(parents=True)
    assert "no images under" in fails(capsys, "forget", *request, "--domain-examples", tmp_path / "empty", "--out", p)
    (root / "photo" / "bad.png").write_bytes(b"not an image")
    err = fails(capsys, "forget", *request, "--domain-examples", root, "--out", p)
    assert "--domain-examples: cannot read" in err and "bad.png" in err
    (root / "photo" / "bad.png").unlink()
    err = fails(capsys, "forget", "--model", "proving-ground", *VOCAB, "--forget-classes", "fish", *FAST,
                "--domain-examples", root, "--out", p)
    assert "domain_examples are for the domain gate's detectors" in err
    assert not p.exists()


def test_read_images_fills_one_tensor_in_the_towers_dtype(tmp_path):
    from PIL import Image

    from clipforget_fast import ImageFiles, read_images
    from clipforget_fast.cli import pixel_dtype

    raw, _, _, _ = pg.render_raw(["fish", "house"], ["photo"], 2, seed=5_000_007)
    files = []
    for k, img in enumerate(raw):
        files.append(tmp_path / f"{k}.png")
        Image.fromarray(img).save(files[-1])

    def preprocess(im):
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255 - 0.5

    each = torch.stack([preprocess(Image.open(f).convert("RGB")) for f in files])
    assert torch.equal(read_images(files, preprocess, "--images"), each)
    held = read_images(files, preprocess, "--images", torch.bfloat16)
    assert held.dtype == torch.bfloat16 and torch.equal(held, each.bfloat16())
    model, _, _ = pg.load()
    assert pixel_dtype(model) == torch.float32 and pixel_dtype(model.to(torch.bfloat16)) == torch.bfloat16
    # ImageFiles decodes only the slice asked for, as read_images would
    source = ImageFiles(files, preprocess, torch.float16)
    assert len(source) == 4 and torch.equal(source[1:3], each[1:3].half())
    assert source[4:9].shape == (0, 3, 48, 48) and source[4:9].dtype == torch.float16
    with pytest.raises(TypeError, match="read by slices"):
        source[0]
    Image.fromarray(raw[0][:20]).save(tmp_path / "short.png")
    with pytest.raises(ValueError, match=r"--images: '.*short.png' preprocesses to \(3, 20, 48\), the images before it "
                                         r"to \(3, 48, 48\)"):
        read_images(files + [tmp_path / "short.png"], preprocess, "--images")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"examples: cannot read '.*bad.png'"):
        ImageFiles(files + [tmp_path / "bad.png"], preprocess, what="examples")[3:5]
    with pytest.raises(ValueError, match=r"preprocess gave a dict for '.*0.png', not one image \[3, H, W\] \(a Hugging"):
        read_images(files, lambda im: {"pixel_values": preprocess(im)[None]})
    for args, error, message in ((([], preprocess), ValueError, "no files"), ((files, None), TypeError, "callable"),
                                 ((files, preprocess, torch.long), ValueError, "floating"),
                                 ((files, preprocess, torch.float32, "images", 0), ValueError, "workers")):
        with pytest.raises(error, match=message):
            ImageFiles(*args)


def test_read_images_in_threads_keeps_the_order_and_names_the_first_bad_file(tmp_path):
    from PIL import Image

    from clipforget_fast import ImageFiles, read_images

    raw, _, _, _ = pg.render_raw(["fish", "house", "star"], ["photo", "sketch"], 3, seed=5_000_011)
    files = []
    for k, img in enumerate(raw):
        files.append(tmp_path / f"{k:02d}.png")
        Image.fromarray(img).save(files[-1])
    seen = set()

    def preprocess(im):
        seen.add(threading.get_ident())
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255

    serial = read_images(files, preprocess, workers=1)
    assert len(seen) == 1
    for workers in (2, 3, 7):                 # windows shorter and longer than the 18 files
        assert torch.equal(read_images(files, preprocess, workers=workers), serial)
    assert len(seen) > 1                      # the threads decoded some
    assert torch.equal(ImageFiles(files, preprocess, workers=3)[5:16], serial[5:16])
    # two bad files: the first in the files' order is named, whichever thread finished first
    (tmp_path / "a_bad.png").write_bytes(b"not an image")
    Image.fromarray(raw[0][:20]).save(tmp_path / "b_short.png")
    mixed = files[:4] + [tmp_path / "b_short.png"] + files[4:9] + [tmp_path / "a_bad.png"]
    for workers in (1, 4):
        with pytest.raises(ValueError, match=r"b_short.png' preprocesses to \(3, 20, 48\)"):
            read_images(mixed, preprocess, "--images", workers=workers)
    with pytest.raises(ValueError, match="workers must be an int"):
        read_images(files, preprocess, workers=0)


def test_default_workers_share_the_cores_with_the_local_ranks(monkeypatch):
    from clipforget_fast.images import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == 8                       # at most 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_workers() == 4                       # 16 cores over 4 processes
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert default_workers() == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "not a number")
    assert default_workers() == 8


def test_bad_input_is_named_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "p.safetensors"
    pgm = ["--model", "proving-ground"]
    cases = [
        ([*pgm, *VOCAB, "--forget-classes", "dragon"], "unknown class 'dragon'"),
        ([*pgm, *VOCAB, "--forget-domains", "oil"], "unknown domain 'oil'"),
        ([*pgm, *VOCAB, "--forget-classes", "fish", "--set", "alpha=2"], "ForgetConfig.alpha=2"),
        ([*pgm, *VOCAB, "--forget-classes", "fish", "--set", "colour=1"], "unknown fields ['colour']"),
        ([*pgm, *VOCAB, "--forget-classes", "fish", "--set", "alpha"], "expected field=value"),
        (["--model", "ViT-B-32", "--domains", "photo", "--forget-classes", "fish"], "give --classes and --domains"),
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
    assert out.stat().st_mode & 0o777 == src.stat().st_mode & 0o777       # as a plain mkdir makes it
    assert "exists" in fails(capsys, "apply", "--hf", src, "--patch", p, "--out", out)
    edited = transformers.CLIPModel.from_pretrained(str(out), local_files_only=True)
    with patch.applied(hf):
        for (name, w), (_, want) in zip(edited.named_parameters(), hf.named_parameters()):
            assert torch.equal(w, want), name
    assert transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)("a dog")["input_ids"]
    # evaluate needs the folder's image processor
    from PIL import Image

    images = tmp_path / "images"
    for d, c in [("photo", "dog"), ("sketch", "dog"), ("photo", "car")]:
        (images / d / c).mkdir(parents=True)
        for k in range(2):
            Image.fromarray(torch.randint(0, 256, (40, 40, 3), dtype=torch.uint8).numpy()).save(images / d / c / f"{k}.png")
    assert "no preprocessor_config.json" in fails(capsys, "evaluate", "--hf", src, "--images", images)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(str(src))
    got = json.loads(run(capsys, "evaluate", "--hf", src, "--images", images, "--patch", p, "--json"))
    assert got["images"] == 6 and got["classes"] == ["dog", "cat", "car", "tree"]    # the patch's vocabulary
    assert got["before"][2][1] is None and got["after"][0][0] is not None


def test_module_entry_point(tmp_path):
    r = subprocess.run([sys.executable, "-m", "clipforget_fast", "info", str(tmp_path / "none.safetensors")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no patch file at" in r.stderr


def test_prototypes_take_the_proving_grounds_vocabulary(capsys, tmp_path):
    """`prototypes` forgets nothing: on the proving ground a vocabulary left out (or half given) is its
    own, and a --spec without forget keys is the vocabulary of every cell."""
    from clipforget_fast.synthesis import PrototypeBank

    tiny = ["--set", "prototypes_per_cell=1", "--set", "steps=1"]
    bank = tmp_path / "bank.safetensors"
    assert "10 cells" in run(capsys, "prototypes", "--model", "proving-ground", "--classes", "fish,house", *tiny,
                             "--out", bank)
    assert set(PrototypeBank.load(bank).images) == {(c, d) for c in ("fish", "house") for d in pg.DOMAINS}
    spec = tmp_path / "vocabulary.json"
    spec.write_text(json.dumps({"classes": ["fish", "house"], "domains": ["photo", "sketch"]}))
    assert "4 cells" in run(capsys, "prototypes", "--model", "proving-ground", "--spec", spec, *tiny, "--out", bank)


def test_prototype_bank_is_exported():
    import clipforget_fast
    from clipforget_fast.synthesis import PrototypeBank

    assert clipforget_fast.PrototypeBank is PrototypeBank and "PrototypeBank" in clipforget_fast.__all__


def test_names_from_a_file_skip_comment_lines_only(tmp_path):
    from clipforget_fast.cli import _names

    f = tmp_path / "names.txt"
    f.write_text("# the classes\nfish\n\nC#\n   # an indented comment\nhot dog, chili\nF# minor \n")
    assert _names(f"@{f}", "--classes") == ["fish", "C#", "hot dog, chili", "F# minor"]
    assert _names("C#,F#", "--classes") == ["C#", "F#"]        # the same names as a comma list


def test_config_values_of_the_wrong_type_or_not_finite_are_named(capsys, tmp_path):
    out = tmp_path / "p.safetensors"
    request = ["--model", "proving-ground", *VOCAB, "--forget-classes", "fish", *FAST]
    for value, msg in (("use_text=False", "ForgetConfig.use_text='False': must be True or False"),
                       ("use_prototypes=no", "ForgetConfig.use_prototypes='no': must be True or False"),
                       ("batch_size=true", "ForgetConfig.batch_size=True: must be an int"),
                       ("redirect_gain=Infinity", "ForgetConfig.redirect_gain=inf: must be a finite number"),
                       ("step_size=NaN", "ForgetConfig.step_size=nan: must be a finite number"),
                       ("step_size=fast", "ForgetConfig.step_size='fast': must be a finite number"),
                       ("gate_keep_order=-Infinity", "ForgetConfig.gate_keep_order=-inf: must be None or a finite"),
                       ("device=5", "ForgetConfig.device=5: must be None or a device name")):
        err = fails(capsys, "forget", *request, "--set", value, "--out", out)
        assert msg in err, (value, err)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"step_size": None}))
    assert "ForgetConfig.step_size=None: must be a finite number" in fails(capsys, "forget", *request, "--config",
                                                                           config, "--out", out)
    assert not out.exists()


def test_device_is_checked_before_any_work(capsys, tmp_path):
    out = tmp_path / "p.safetensors"
    request = ["--model", "proving-ground", *VOCAB, "--forget-classes", "fish", *FAST, "--out", out]
    err = fails(capsys, "forget", *request, "--device", "foo")
    assert "--device 'foo': is not a device name" in err and "Traceback" not in err
    err = fails(capsys, "forget", *request, "--set", "device=toaster")
    assert "ForgetConfig.device='toaster': is not a device name" in err
    if not torch.cuda.is_available():
        assert "--device 'cuda': no CUDA device is available here" in fails(capsys, "forget", *request, "--device",
                                                                            "cuda")
        assert "ForgetConfig.device='cuda': no CUDA device" in fails(capsys, "forget", *request, "--set",
                                                                     "device=cuda")
    assert "--device 'foo'" in fails(capsys, "evaluate", "--model", "proving-ground", "--images", tmp_path,
                                     "--device", "foo")
    run(capsys, "forget", *request, "--device", "cpu", "--set", "device=cpu")


def test_weights_that_do_not_load_are_named(capsys, tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "p.safetensors"
    garbage, foreign, pickled = tmp_path / "garbage.safetensors", tmp_path / "foreign.safetensors", tmp_path / "w.pt"
    garbage.write_text("garbage")
    pickled.write_text("garbage")
    save_file({"x": torch.zeros(2)}, str(foreign))
    request = [*VOCAB, "--forget-classes", "fish", *FAST, "--out", out]
    oc = ["--model", "ProvingGround-ViT-48", "--model-config", CONFIG_PATH]
    for model, weights, kind in ((["--model", "proving-ground"], garbage, "SafetensorError"),
                                 (["--model", "proving-ground"], foreign, "RuntimeError"),
                                 (oc, garbage, "SafetensorError"), (oc, foreign, "RuntimeError"), (oc, pickled, "")):
        err = fails(capsys, "forget", *model, "--checkpoint", weights, *request)
        assert f"--checkpoint: cannot load {str(weights)!r} as " in err and kind in err, err
        assert "Missing key" not in err          # the loader's first line, not its list of every key
    (tmp_path / "config.json").write_text("{\n")
    err = fails(capsys, "forget", "--model", "Custom", "--model-config", tmp_path / "config.json", "--checkpoint",
                garbage, *request)
    assert "--model-config: " in err and "is not valid JSON" in err
    (tmp_path / "Custom.json").write_text(json.dumps({"embed_dim": 8}))
    err = fails(capsys, "forget", "--model", "Custom", "--model-config", tmp_path / "Custom.json", "--checkpoint",
                garbage, *request)
    assert "is not an open_clip model config" in err and "it lacks vision_cfg, text_cfg" in err
    assert not out.exists()


def test_a_hugging_face_folder_that_does_not_load_is_named(capsys, tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    err = fails(capsys, "forget", "--hf", tmp_path / "hf", "--classes", "a,b", "--domains", "x", "--forget-classes",
                "a", "--out", tmp_path / "p.safetensors")
    assert f"--hf: cannot load {str(tmp_path / 'hf')!r} as a Hugging Face CLIPModel folder (OSError: " in err


def test_out_that_is_a_folder_is_refused_before_any_work(capsys, tmp_path):
    folder = tmp_path / "dd.safetensors"
    folder.mkdir()
    p = tmp_path / "p.safetensors"
    for argv in (["forget", "--model", "proving-ground", *VOCAB, "--forget-classes", "fish", *FAST],
                 ["prototypes", "--model", "proving-ground", *VOCAB],
                 ["apply", "--model", "proving-ground", "--patch", p]):
        err = fails(capsys, *argv, "--out", folder)
        assert f"--out: {str(folder)!r} is a directory" in err, argv
    assert sorted(x.name for x in tmp_path.iterdir()) == ["dd.safetensors"] and not any(folder.iterdir())


def test_input_files_that_are_not_utf8_or_of_the_wrong_shape_are_named(capsys, tmp_path):
    out = tmp_path / "p.safetensors"
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    pgm = ["--model", "proving-ground"]
    for argv, flag in (([*pgm, "--classes", f"@{binary}", "--forget-classes", "fish"], "--classes"),
                       ([*pgm, "--spec", binary], "--spec"),
                       ([*pgm, *VOCAB, "--forget-classes", "fish", "--config", binary], "--config")):
        assert f"{flag}: {str(binary)!r} is not UTF-8 text" in fails(capsys, "forget", *argv, "--out", out), flag
    spec = tmp_path / "spec.json"
    for key, value in (("class_phrases", ["x"]), ("domain_phrases", "abc")):
        spec.write_text(json.dumps({"classes": ["fish"], "domains": ["photo"], "forget_classes": ["fish"], key: value}))
        err = fails(capsys, "forget", *pgm, "--spec", spec, "--out", out)
        assert f"{key} must be a mapping" in err and repr(value) in err, err
    assert not out.exists()


def test_a_saved_spec_is_checked_whole(capsys, tmp_path):
    """--spec with a ForgetSpec.to_dict(): its mode must be one a spec has and match its cells, and
    unknown keys are refused as they are in a plain request."""
    out, spec = tmp_path / "p.safetensors", tmp_path / "spec.json"
    saved = ForgetSpec(["fish", "house"], ["photo", "sketch"], forget_classes=["fish"]).to_dict()
    for changes, msg in (({"mode": "banana"}, "--spec: mode 'banana' is not one of"),
                         ({"mode": "domain-complete"}, "--spec: mode 'domain-complete' does not match the cells"),
                         ({"junk": 1}, "--spec: unknown keys ['junk']")):
        spec.write_text(json.dumps({**saved, **changes}))
        assert msg in fails(capsys, "forget", "--model", "proving-ground", "--spec", spec, "--out", out), changes
    assert not out.exists()
    spec.write_text(json.dumps(saved))
    run(capsys, "forget", "--model", "proving-ground", "--spec", spec, *FAST, "--out", out)
    assert Patch.load(out).spec == saved


def test_evaluate_names_a_bad_template(capsys, tmp_path):
    from PIL import Image

    raw, _, _, _ = pg.render_raw(["fish"], ["photo"], 1, seed=5_000_011)
    (tmp_path / "photo" / "fish").mkdir(parents=True)
    Image.fromarray(raw[0]).save(tmp_path / "photo" / "fish" / "0.png")
    evaluate = ["evaluate", "--model", "proving-ground", "--images", tmp_path, "--templates"]
    for template, msg in (("a {foo} of {cls}", "a placeholder other than {cls}/{domain}: {foo}"),
                          ("a {cls", "is not a format string"), ("a photo", "has no '{cls}' placeholder"),
                          ("a photo of {{cls}}.", "has no '{cls}' placeholder")):
        err = fails(capsys, *evaluate, template)
        assert f"--templates: template {template!r} " in err and msg in err, err
    assert "accuracy (%)" in run(capsys, *evaluate, "a {domain} of a {cls}.")
