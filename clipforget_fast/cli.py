"""Command line: compute a patch, merge patches into a checkpoint, measure a patch on your own
images, describe a patch.

    clipforget forget --model ViT-B-32 --checkpoint clip.safetensors \\
        --classes dog,cat,car --domains photo,sketch,painting \\
        --forget-classes dog --forget-domains sketch --out dog_sketch.safetensors
    clipforget apply  --model ViT-B-32 --checkpoint clip.safetensors \\
        --patch dog_sketch.safetensors --out clip_edited.safetensors
    clipforget evaluate --model ViT-B-32 --checkpoint clip.safetensors \\
        --images my_images/ --patch dog_sketch.safetensors
    clipforget info   dog_sketch.safetensors

(``python -m clipforget_fast`` is the same program.) The model is an open_clip architecture with its
weights (``--model NAME --checkpoint FILE``; ``--model-config JSON`` registers a custom architecture
first), the embedded proving-ground model (``--model proving-ground``, the checkpoint optional), or a
Hugging Face ``CLIPModel`` saved in a local folder with its tokenizer (``--hf DIR``). Nothing is
downloaded. The request comes from ``--classes/--domains/--forget-classes/--forget-domains`` (comma
lists, or ``@file`` with one name per line; blank lines and lines that start with ``#`` are skipped, and a
``#`` inside a name is part of it) or from ``--spec FILE`` (JSON: those four keys, optionally
``templates``, ``domain_phrases``, ``class_phrases``; or a ``ForgetSpec.to_dict()``). ``ForgetConfig``
fields come from ``--config FILE`` (JSON) and ``--set field=value`` (value read as JSON when it parses,
else as a string). ``forget --domain-examples DIR`` reads real images under ``DIR/<domain>/`` (any
subfolders) for the domain gate's detectors (``forget``'s ``domain_examples``).

``apply`` merges the patches, in the order given, into the weights and writes them where a plain
loader reads them: a safetensors state dict for open_clip (``open_clip.create_model(name,
pretrained=FILE)``, or ``--checkpoint`` of the proving ground), a ``save_pretrained`` folder with the
tokenizer for Hugging Face. Every output is written to a temporary name and moved into place, so a
failed run leaves nothing behind. ``evaluate`` reads a folder laid out as ``<domain>/<class>/<image>``,
preprocesses the images as the model's loader says, and prints the zero-shot accuracy of every
(class, domain) cell before and after the patches (the check that ``forget``'s self-check on its own
prototypes cannot make). Errors in the input exit with status 2 and a message naming it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pickle
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import SafetensorError

from .config import ForgetConfig, device_error, first_line
from .images import IMAGE_SUFFIXES, ImageFiles
from .patch import Patch, atomic_safetensors, plain_permissions, safetensors_path
from .spec import ForgetSpec, check_templates
from .synthesis import PrototypeBank

PROVING_GROUND = "proving-ground"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}   # --precision: weight dtype
# what the loaders raise on a file or folder that is not the weights they read (a corrupt or foreign
# safetensors file, a state dict of another architecture, a pickle that is not one, a folder without weights)
LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError, SafetensorError)
# the keys of a --spec request, and those of a ForgetSpec.to_dict()
REQUEST_KEYS = {"classes", "domains", "forget_classes", "forget_domains", "templates", "domain_phrases",
                "class_phrases"}
SPEC_DICT_KEYS = {"classes", "domains", "mode", "forget_cells", "retain_cells", "templates", "domain_phrases",
                  "class_phrases"}


class UsageError(ValueError):
    """Bad command-line input (exit status 2)."""


# ---- model ---------------------------------------------------------------------------------------
def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (one of --model, --hf)")
    g.add_argument("--model", help=f"open_clip architecture name (as open_clip spells it), or {PROVING_GROUND!r}")
    g.add_argument("--checkpoint", help="weights of --model (a file open_clip reads: .safetensors, .pt, .bin)")
    g.add_argument("--model-config", help="open_clip model config JSON to register first (its stem is the name)")
    g.add_argument("--random-weights", action="store_true",
                   help="build --model with random weights (mechanics and speed only; nothing is forgotten)")
    g.add_argument("--hf", metavar="DIR", help="folder of a Hugging Face CLIPModel and its tokenizer")
    g.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="weight dtype")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the model runs: cpu, cuda, cuda:1, ... (checked before any work)")


def check_device(value: str, label: str) -> str:
    """``value`` when torch reads it as a device and this machine has that device; UsageError starting
    with ``label`` otherwise."""
    why = device_error(value)
    if why is None:
        device = torch.device(value)
        if device.type == "cuda" and not torch.cuda.is_available():
            why = "no CUDA device is available here (torch.cuda.is_available() is False)"
        elif device.type != "cpu":
            try:
                torch.empty(0, device=device)
            except (RuntimeError, AssertionError) as e:      # an index past the last GPU, a backend not built
                why = f"cannot be used here ({first_line(e)})"
    if why is not None:
        raise UsageError(f"{label}: {why}")
    return value


def family(args) -> str:
    """"hf", "proving-ground" or "open_clip": which loader the model arguments name."""
    if (args.model is None) == (args.hf is None):
        raise UsageError("give exactly one of --model NAME and --hf DIR")
    return "hf" if args.hf is not None else PROVING_GROUND if args.model == PROVING_GROUND else "open_clip"


def load_model(args) -> tuple[torch.nn.Module, object, object]:
    """(model in eval mode, tokenizer, preprocess: PIL image -> [3, H, W] normalized) from the model
    arguments (the preprocess is None for a Hugging Face folder without an image processor)."""
    family(args)
    dtype = PRECISIONS[args.precision]
    if args.hf is not None:
        if args.checkpoint or args.model_config or args.random_weights:
            raise UsageError("--checkpoint, --model-config and --random-weights go with --model, not --hf")
        return _load_hf(Path(args.hf), dtype, args.device)
    if args.model == PROVING_GROUND:
        from . import proving_ground as pg

        if args.model_config or args.random_weights:
            raise UsageError(f"--model {PROVING_GROUND} takes only --checkpoint (its weights, optional)")
        with _loading("--checkpoint", args.checkpoint, f"{PROVING_GROUND} weights"):
            model, tokenizer, preprocess = pg.load(args.device, weights=_existing(args.checkpoint, "--checkpoint"))
        return model.to(dtype), tokenizer, preprocess
    import open_clip

    if args.model_config:
        cfg = _json_file(args.model_config, "--model-config")
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
        if missing or Path(args.model_config).suffix != ".json":     # what open_clip skips without a word
            lacks = f"; it lacks {', '.join(missing)}" if missing else ""
            raise UsageError(f"--model-config: {args.model_config!r} is not an open_clip model config (a .json "
                             f"file with embed_dim, vision_cfg and text_cfg{lacks})")
        open_clip.add_model_config(args.model_config)
    if args.model not in open_clip.list_models():
        raise UsageError(f"--model: unknown open_clip architecture {args.model!r} (see open_clip.list_models(); "
                         "a custom one needs --model-config)")
    if args.random_weights == bool(args.checkpoint):
        raise UsageError(f"--model {args.model}: give its weights with --checkpoint FILE "
                         "(or --random-weights for mechanics only)")
    with _loading("--checkpoint", args.checkpoint, f"{args.model} weights"):
        model, _, preprocess = open_clip.create_model_and_transforms(
            args.model, pretrained=_existing(args.checkpoint, "--checkpoint"), device=args.device,
            precision=args.precision)
    return model.eval(), open_clip.get_tokenizer(args.model), preprocess


@contextlib.contextmanager
def _loading(flag: str, path, what: str):
    """Turns a loader's error on ``path`` (given by ``flag``; None: nothing of the user's is read) into a
    UsageError naming both, with the first line of the loader's message."""
    try:
        yield
    except UsageError:
        raise
    except LOAD_ERRORS as e:
        if path is None:
            raise
        raise UsageError(f"{flag}: cannot load {str(path)!r} as {what} ({type(e).__name__}: {first_line(e)})") from e


def _load_hf(path: Path, dtype: torch.dtype, device: str):
    try:
        import transformers
    except ImportError as e:
        raise UsageError("--hf needs the transformers package (pip install 'clipforget_fast[hf]')") from e
    if not (path / "config.json").is_file():
        raise UsageError(f"--hf: {str(path)!r} is not a saved model folder (no config.json)")
    with _loading("--hf", path, "a Hugging Face CLIPModel folder"):
        model = transformers.CLIPModel.from_pretrained(str(path), local_files_only=True).to(dtype)
    with _loading("--hf", path, "a folder with the model's tokenizer"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    preprocess = None
    if (path / "preprocessor_config.json").is_file():
        with _loading("--hf", path, "a folder with a CLIPImageProcessor (its preprocessor_config.json)"):
            processor = transformers.CLIPImageProcessor.from_pretrained(str(path), local_files_only=True)
        preprocess = lambda im: processor(images=im, return_tensors="pt")["pixel_values"][0]  # noqa: E731
    return model.to(device).eval(), tokenizer, preprocess


def _existing(path, flag: str):
    if path is not None and not Path(path).is_file():
        raise UsageError(f"{flag}: no file at {str(path)!r}")
    return path


def _out_file(path) -> Path:
    """--out as a .safetensors file to write: its folder exists and it is not itself a folder (checked
    before any work, not when the result is moved into place)."""
    out = safetensors_path(path, "--out")
    if out.is_dir():
        raise UsageError(f"--out: {str(out)!r} is a directory; give the path of a .safetensors file")
    return out


def _read_text(f: Path, flag: str) -> str:
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{flag}: {str(f)!r} is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise UsageError(f"{flag}: cannot read {str(f)!r} ({e.strerror or e})") from e


# ---- request and config ------------------------------------------------------------------------
def _names(value, flag: str) -> list[str] | None:
    """A comma list, or @file with one name per line: blank lines and lines that start with '#' (a comment)
    are skipped; a '#' after the start of a line belongs to the name ("C#")."""
    if value is None:
        return None
    if value.startswith("@"):
        f = Path(value[1:])
        if not f.is_file():
            raise UsageError(f"{flag}: no file at {str(f)!r}")
        items = [ln.strip() for ln in _read_text(f, flag).splitlines()]
        items = [s for s in items if not s.startswith("#")]
    else:
        items = [s.strip() for s in value.split(",")]
    items = [s for s in items if s]
    if not items:
        raise UsageError(f"{flag}: no names in {value!r}")
    return items


def _proving_ground_words(args) -> dict:
    """With ``--model proving-ground``: its vocabulary (``classes``, ``domains``), which a request on it
    takes where it names none; else {}. (The library's phrases for names it knows, ``pixel_art`` as "pixel
    art image", are the proving ground's.)"""
    if getattr(args, "model", None) != PROVING_GROUND or getattr(args, "hf", None) is not None:
        return {}
    from . import proving_ground as pg

    return dict(classes=list(pg.CLASSES), domains=list(pg.DOMAINS))


def build_spec(args, vocabulary_only: bool = False) -> ForgetSpec:
    """The request of the arguments. ``vocabulary_only`` (``prototypes``): a request that forgets nothing
    is given every domain to forget, as a stand-in (the prototypes do not depend on it)."""
    listed = [args.classes, args.domains, args.forget_classes, args.forget_domains]
    if args.spec is not None:
        if any(v is not None for v in listed):
            raise UsageError("give the request either as --spec FILE or as --classes/--domains/--forget-*, not both")
        d = _json_file(args.spec, "--spec")
        if "forget_cells" in d:
            extra = set(d) - SPEC_DICT_KEYS
            if extra:
                raise UsageError(f"--spec: unknown keys {sorted(extra)} in a ForgetSpec.to_dict()")
            try:
                return ForgetSpec.from_dict(d)
            except (KeyError, TypeError) as e:
                raise UsageError(f"--spec: not a complete ForgetSpec.to_dict() ({type(e).__name__}: {e})") from e
            except ValueError as e:
                raise UsageError(f"--spec: {e}") from e
        extra = set(d) - REQUEST_KEYS
        if extra:
            raise UsageError(f"--spec: unknown keys {sorted(extra)}")
        kw = dict(d)
    else:
        own = _proving_ground_words(args)
        if (args.classes is None or args.domains is None) and not own:
            raise UsageError("give --classes and --domains (or --spec FILE)")
        kw = dict(classes=_names(args.classes, "--classes") if args.classes is not None else own.get("classes"),
                  domains=_names(args.domains, "--domains") if args.domains is not None else own.get("domains"),
                  forget_classes=_names(args.forget_classes, "--forget-classes"),
                  forget_domains=_names(args.forget_domains, "--forget-domains"))
    if "classes" not in kw or "domains" not in kw:
        raise UsageError("--spec: the request needs 'classes' and 'domains'")
    if vocabulary_only and kw.get("forget_classes") is None and kw.get("forget_domains") is None:
        kw["forget_domains"] = kw["domains"]
    try:
        return ForgetSpec(**kw)
    except TypeError as e:           # e.g. a JSON string where a list of names belongs
        raise UsageError(str(e)) from e


def build_config(args) -> ForgetConfig:
    d = _json_file(args.config, "--config") if args.config else {}
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected field=value")
        try:
            d[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            d[key.strip()] = raw
    try:
        config = ForgetConfig.from_dict(d)
    except TypeError as e:
        raise UsageError(f"ForgetConfig: {e}") from e
    if config.device is not None:          # a name torch reads (the config checks that); here: one this machine has
        check_device(config.device, f"ForgetConfig.device={config.device!r}")
    return config


def _json_file(path, flag: str) -> dict:
    f = Path(path)
    if not f.is_file():
        raise UsageError(f"{flag}: no file at {str(f)!r}")
    try:
        d = json.loads(_read_text(f, flag))
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag}: {str(f)!r} is not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise UsageError(f"{flag}: {str(f)!r} must hold a JSON object")
    return d


# ---- commands ------------------------------------------------------------------------------------
def cmd_forget(args) -> int:
    from .pipeline import forget

    out = _out_file(args.out)
    config = build_config(args)
    family(args)
    spec = build_spec(args)                        # the request is checked before any model is loaded
    bank = PrototypeBank.load(_existing(args.prototypes, "--prototypes")) if args.prototypes else None
    folders = domain_folder(Path(args.domain_examples), spec.domains) if args.domain_examples else None
    for files in (folders or {}).values():
        image_headers(files, "--domain-examples")
    model, tokenizer, preprocess = load_model(args)
    examples = None
    if folders is not None:
        if preprocess is None:
            raise UsageError(f"--hf: {args.hf!r} has no preprocessor_config.json (the image processor)")
        examples = {d: ImageFiles(files, preprocess, pixel_dtype(model), "--domain-examples")
                    for d, files in folders.items()}     # decoded a batch at a time as the gate reads them
    t = time.perf_counter()
    patch = forget(model, tokenizer, spec, config, prototypes=bank, domain_examples=examples)
    secs = time.perf_counter() - t
    patch.save(out)
    summary = {"patch": str(out), "mode": spec.mode, "edit": patch.info.get("edit"),
               "forget_cells": len(spec.forget_cells), "retain_cells": len(spec.retain_cells),
               "layers": {e.name: e.rank for e in patch.entries}, "seconds": round(secs, 2),
               "timings": patch.timings, "self_check": patch.info.get("self_check")}
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(f"{spec!r}: edit {summary['edit']!r} in {secs:.1f} s; {patch!r}")
        print(f"wrote {out}")
    return 0


def cmd_prototypes(args) -> int:
    from .pipeline import synthesize_prototypes

    out = _out_file(args.out)
    config = build_config(args)
    family(args)
    spec = build_spec(args, vocabulary_only=True)     # every cell is synthesized, whatever is forgotten
    model, tokenizer, _ = load_model(args)
    bank = synthesize_prototypes(model, tokenizer, spec, config)
    bank.save(out)
    st = bank.stats
    print(f"{st['prototypes']} prototypes for {len(bank.images)} cells in {st['seconds']:.1f} s "
          f"({st['accepted']} accepted at p ≥ {config.accept_prob}); wrote {out}")
    return 0


def apply_all(model, files, patches, force: bool) -> None:
    """Apply ``patches`` (loaded from ``files``) to ``model`` in order."""
    for f, p in zip(files, patches):
        try:
            p.apply(model, force=force)
        except ValueError as e:
            raise UsageError(patch_error(f, e)) from e


def patch_error(file, e: ValueError) -> str:
    """The message for a patch file that does not apply to the model given."""
    return (f"--patch {file}: {e} (here: --force); a patch applies to the weights it was computed on, so give "
            "--checkpoint the weights it was computed from")


def cmd_apply(args) -> int:
    kind = family(args)
    if kind == "hf":
        out = Path(args.out)
        if out.exists():
            raise UsageError(f"--out: {str(out)!r} exists; give a new folder for the Hugging Face model")
        if not out.parent.is_dir():
            raise UsageError(f"--out: directory {str(out.parent)!r} does not exist")
    else:
        out = _out_file(args.out)
    patches = [Patch.load(_existing(p, "--patch")) for p in args.patch]
    model, tokenizer, _ = load_model(args)
    apply_all(model, args.patch, patches, args.force)
    if kind == "hf":
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        try:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            plain_permissions(tmp, directory=True)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        meta = {"clipforget_patches": json.dumps([{"file": Path(f).name, "mode": p.spec.get("mode"),
                                                   "edit": p.info.get("edit")} for f, p in zip(args.patch, patches)])}
        if kind == PROVING_GROUND:
            meta["pool_type"] = model.visual.pool_type          # pg.load reads it back
        atomic_safetensors(state, out, meta)
    print(f"merged {len(patches)} patch(es) into {kind} weights: wrote {out}")
    return 0


def config_changed(p: Patch) -> dict:
    """The fields of ``p``'s config that differ from today's defaults. A field whose default (None)
    resolves per edit counts as unchanged where the patch records the value it resolved to (as patches
    written before that default was None do)."""
    config = ForgetConfig()
    default = config.to_dict()
    resolved = {"gate_keep_order": config.gate_keep_order_for(bool((p.info.get("gate") or {}).get("examples"))),
                "retain_energy": config.retain_energy_for(p.info.get("edit"))}
    return {k: v for k, v in p.config.items()
            if default.get(k) != v and not (default.get(k) is None and v is not None and v == resolved.get(k))}


def cmd_info(args) -> int:
    p = Patch.load(args.patch)
    spec, info = p.spec, p.info
    changed = config_changed(p)
    d = {"file": args.patch, "library_version": p.version, "mode": spec.get("mode"), "edit": info.get("edit"),
         "classes": len(spec.get("classes", [])), "domains": len(spec.get("domains", [])),
         "forget_cells": spec.get("forget_cells"), "config_changed": changed,
         "entries": [{"name": e.name, "layout": e.layout, "shape": list(e.shape), "rank": e.rank}
                     for e in p.entries],
         "timings": p.timings, "self_check": info.get("self_check")}
    if args.json:
        print(json.dumps(d, indent=2, default=str))
        return 0
    print(f"{args.patch}: clipforget_fast {p.version} patch, mode {d['mode']!r}, edit {d['edit']!r}")
    cells = ", ".join(f"{c}/{dm}" for c, dm in (d["forget_cells"] or [])[:8])
    more = len(d["forget_cells"] or []) - 8
    print(f"  vocabulary {d['classes']} classes × {d['domains']} domains; forgets {cells}"
          + (f" and {more} more" if more > 0 else ""))
    print(f"  config: {'default' if not changed else changed}")
    for e in d["entries"]:
        print(f"  {e['name']}  [out {e['shape'][0]} × in {e['shape'][1]}]  rank {e['rank']}")
    if d["timings"]:
        print("  timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in d["timings"].items()))
    return 0


def image_folder(root: Path, per_cell: int | None = None) -> dict:
    """{(class, domain): [image files]} of a folder laid out as root/<domain>/<class>/<image>, sorted by
    name (the first ``per_cell`` of each cell when given)."""
    if not root.is_dir():
        raise UsageError(f"--images: no folder at {str(root)!r}")
    cells = {}
    for ddir in sorted(p for p in root.iterdir() if p.is_dir()):
        for cdir in sorted(p for p in ddir.iterdir() if p.is_dir()):
            files = sorted(f for f in cdir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if files:
                cells[(cdir.name, ddir.name)] = files[:per_cell] if per_cell else files
    if not cells:
        raise UsageError(f"--images: no images under {str(root)!r} (expected <domain>/<class>/<image> files)")
    return cells


def domain_folder(root: Path, domains) -> dict:
    """{domain: [image files]} of a folder laid out as root/<domain>/.../<image> (any subfolders: only the
    domain is read), sorted by path; every <domain> must be one of ``domains``."""
    if not root.is_dir():
        raise UsageError(f"--domain-examples: no folder at {str(root)!r}")
    found = {}
    for ddir in sorted(p for p in root.iterdir() if p.is_dir()):
        if ddir.name not in domains:
            raise UsageError(f"--domain-examples: folder {ddir.name!r} is not one of the request's domains "
                             f"{list(domains)}")
        files = sorted(f for f in ddir.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            found[ddir.name] = files
    if not found:
        raise UsageError(f"--domain-examples: no images under {str(root)!r} (expected <domain>/<image> files)")
    return found


def image_headers(files, flag: str) -> None:
    """Every file opens as an image (its header only, nothing decoded): a folder with a file that is no
    image fails at once rather than when the edit reaches it."""
    from PIL import Image

    for f in files:
        try:
            with Image.open(f):
                pass
        except OSError as e:
            raise UsageError(f"{flag}: cannot read {str(f)!r} ({e})") from e


def pixel_dtype(model) -> torch.dtype:
    """The floating dtype the image tower reads its pixels in (its weights'), fp32 when it has none."""
    from .layers import _pixel_dtype

    dtype = _pixel_dtype(model)
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def cmd_evaluate(args) -> int:
    from .evaluate import PatchNotApplied, evaluate, evaluate_patches

    if args.per_cell is not None and args.per_cell < 1:
        raise UsageError(f"--per-cell {args.per_cell}: must be ≥ 1")
    if args.templates is not None:            # evaluate checks them too; here before any model is loaded
        try:
            check_templates(args.templates)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--templates: {e}") from e
    cells = image_folder(Path(args.images), args.per_cell)
    patches = [Patch.load(_existing(p, "--patch")) for p in args.patch or []]
    vocab = patches[-1].spec if patches else {}
    classes = _names(args.classes, "--classes") or vocab.get("classes") or sorted({c for c, _ in cells})
    domains = _names(args.domains, "--domains") or vocab.get("domains") or sorted({d for _, d in cells})
    unknown = sorted(cell for cell in cells if cell[0] not in classes or cell[1] not in domains)
    if unknown:
        raise UsageError(f"--images: folders outside the vocabulary ({len(classes)} classes × {len(domains)} "
                         f"domains): {', '.join(f'{d}/{c}' for c, d in unknown[:5])}")
    files = [f for fs in cells.values() for f in fs]
    image_headers(files, "--images")
    family(args)
    model, tokenizer, preprocess = load_model(args)
    if preprocess is None:
        raise UsageError(f"--hf: {args.hf!r} has no preprocessor_config.json (the image processor)")
    images = ImageFiles(files, preprocess, pixel_dtype(model), "--images")   # decoded a batch at a time
    ci = torch.tensor([classes.index(c) for (c, _), fs in cells.items() for _ in fs])
    di = torch.tensor([domains.index(d) for (_, d), fs in cells.items() for _ in fs])
    words = dict(classes=classes, domains=domains, domain_phrases={k: v for k, v in vocab.get("domain_phrases", {}).items()
                                                                   if k in domains} or None,
                 class_phrases={k: v for k, v in vocab.get("class_phrases", {}).items() if k in classes} or None,
                 templates=args.templates)
    if patches:                                # every file decoded once, scored before and after
        try:
            before, after = evaluate_patches(model, tokenizer, patches, images, ci, di, force=args.force, **words)
        except PatchNotApplied as e:
            raise UsageError(patch_error(args.patch[e.index], e)) from e
    else:
        before = evaluate(model, tokenizer, images, ci, di, **words)
    result = {"images": len(ci), "classes": classes, "domains": domains, "before": _matrix(before)}
    lines = [f"{len(ci)} images in {len(cells)} cells; chance {100 * before.chance:.1f}%",
             "before:" if patches else "accuracy (%):", before.table()]
    if patches:
        forgotten = sorted({tuple(c) for p in patches for c in p.spec.get("forget_cells", [])})
        kept = [(c, d) for c in classes for d in domains if (c, d) not in set(forgotten)]
        result["after"] = _matrix(after)
        for name, group in (("forgotten", forgotten), ("kept", kept)):
            result[name] = {"before": _number(before.cell_mean(group)), "after": _number(after.cell_mean(group))}
        lines += [f"after {len(patches)} patch(es):", after.table(),
                  "   ".join(f"{name} cells: " + (" → ".join(f"{100 * v:.1f}%" for v in result[name].values())
                                                  if result[name]["before"] is not None else "no images")
                             for name in ("forgotten", "kept"))]
    print(json.dumps(result, indent=2) if args.json else "\n".join(lines))
    return 0


def _number(v: float) -> float | None:
    """None for NaN (no image to measure; JSON has no NaN)."""
    return None if v != v else v


def _matrix(acc) -> list:
    """Accuracy per [class][domain], None where a cell has no image."""
    return [[_number(v) for v in row] for row in acc.accuracy.tolist()]


def add_request_args(p: argparse.ArgumentParser, forget_optional: bool = False) -> None:
    r = p.add_argument_group("request (or --spec FILE)" if not forget_optional else
                             "vocabulary (or --spec FILE); what is forgotten does not change the prototypes")
    r.add_argument("--spec", help="JSON request")
    r.add_argument("--classes", help="the vocabulary's classes: a,b,c or @file (with --model proving-ground: "
                                     "its 20 unless given)")
    r.add_argument("--domains", help="the vocabulary's domains: photo,sketch or @file (with --model proving-ground: "
                                     "its 5 unless given)")
    r.add_argument("--forget-classes", help="classes to forget (default: every class of --forget-domains)")
    r.add_argument("--forget-domains", help="domains to forget them in (default: every domain)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="clipforget", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("forget", help="compute a patch that makes the model forget a request")
    add_model_args(f)
    add_request_args(f)
    f.add_argument("--config", help="ForgetConfig as JSON")
    f.add_argument("--set", action="append", metavar="FIELD=VALUE", help="one ForgetConfig field (repeatable)")
    f.add_argument("--prototypes", metavar="BANK", help="prototypes made by `clipforget prototypes` to reuse "
                                                        "(cells it lacks are synthesized)")
    f.add_argument("--domain-examples", metavar="DIR",
                   help="real images of some of the request's domains, as DIR/<domain>/.../<image> (any classes; "
                        "only the folder's domain is read): the domain gate's detectors are fitted on them too")
    f.add_argument("--out", required=True, help="the patch file (.safetensors)")
    f.add_argument("--json", action="store_true", help="print the summary as JSON")
    f.set_defaults(run=cmd_forget)
    b = sub.add_parser("prototypes", help="synthesize the prototypes of every cell of a vocabulary once, "
                                          "for several `forget --prototypes` runs")
    add_model_args(b)
    add_request_args(b, forget_optional=True)
    b.add_argument("--config", help="ForgetConfig as JSON (its synthesis fields)")
    b.add_argument("--set", action="append", metavar="FIELD=VALUE", help="one ForgetConfig field (repeatable)")
    b.add_argument("--out", required=True, help="the prototype bank (.safetensors)")
    b.set_defaults(run=cmd_prototypes)
    a = sub.add_parser("apply", help="merge patches into the model's weights and save them")
    add_model_args(a)
    a.add_argument("--patch", nargs="+", action="extend", required=True,
                   help="patch files, applied in this order (--patch a b, or --patch a --patch b)")
    a.add_argument("--out", required=True, help=".safetensors state dict (open_clip), or a new folder (--hf)")
    a.add_argument("--force", action="store_true",
                   help="apply even where a weight differs from the one a patch was computed on")
    a.set_defaults(run=cmd_apply)
    e = sub.add_parser("evaluate", help="zero-shot accuracy per (class, domain) on a folder of images, "
                                        "before and after patches")
    add_model_args(e)
    e.add_argument("--images", required=True, help="folder laid out as <domain>/<class>/<image>")
    e.add_argument("--patch", nargs="+", action="extend", help="patches to apply, in this order (--patch a b, or "
                                                               "--patch a --patch b; the last one's vocabulary "
                                                               "and phrases are used)")
    e.add_argument("--classes", help="the classifier's classes (default: the patch's, else the folders')")
    e.add_argument("--domains", help="the domains (default: the patch's, else the folders')")
    e.add_argument("--templates", nargs="+", help="prompt templates with {cls} and optionally {domain}, no "
                                                  "other field (default: the library's bank)")
    e.add_argument("--per-cell", type=int, help="at most this many images per cell (the first by name)")
    e.add_argument("--force", action="store_true", help="apply patches computed on other weights")
    e.add_argument("--json", action="store_true")
    e.set_defaults(run=cmd_evaluate)
    i = sub.add_parser("info", help="describe a patch file")
    i.add_argument("patch")
    i.add_argument("--json", action="store_true")
    i.set_defaults(run=cmd_info)
    return ap


def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if getattr(args, "device", None) is not None:     # the model commands: before any work
            check_device(args.device, f"--device {args.device!r}")
        return args.run(args)
    except BrokenPipeError:          # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except ValueError as e:          # UsageError, and the library's own errors naming the bad input
        ap.exit(2, f"{ap.prog} {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
