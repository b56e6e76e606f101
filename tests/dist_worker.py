"""One rank of tests/test_distributed.py, launched with torchrun (gloo, CPU): each scenario runs
``forget`` (and ``synthesize_prototypes``) sharded across the ranks and, on the same rank, unsharded
(``distributed=False``) as the reference; the patches and prototypes are written for the test to compare.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py OUT_DIR
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_tiny_clip  # noqa: E402
from open_clip.tokenizer import SimpleTokenizer  # noqa: E402

from clipforget_fast import (ForgetConfig, ForgetSpec, Patch, evaluate, evaluate_patches, forget,  # noqa: E402
                             synthesize_prototypes)
from clipforget_fast.distributed import World  # noqa: E402
from clipforget_fast.synthesis import translate  # noqa: E402

# batches of 7 prototypes: 24 prototypes (12 cells × 2) make 4 batches, 2 per rank, the last one short;
# a low acceptance threshold, so that some prototypes stop early (and batches are compacted)
CONFIG = ForgetConfig(prototypes_per_cell=2, steps=8, batch_size=7, accept_prob=0.12)
CLASSES, DOMAINS = ["dog", "cat", "car", "tree"], ["photo", "sketch", "pixel_art"]
SCENARIOS = {
    "project_domain": (dict(forget_classes=["dog"], forget_domains=["sketch"]),
                       CONFIG.replace(edit="project", targets="proj+mlp")),
    "redirect_domain": (dict(forget_classes=["dog", "car"], forget_domains=["sketch"]),
                        CONFIG.replace(edit="class-redirect")),
    "redirect_global": (dict(forget_classes=["cat"]), CONFIG),
    "redirect_every_class": (dict(forget_classes=CLASSES), CONFIG),      # no cell kept: no keep prompts
    "project_complete": (dict(forget_domains=["pixel_art"]), CONFIG.replace(edit="project", targets="proj+mlp+attn")),
    "gate_complete": (dict(forget_domains=["pixel_art"]), CONFIG.replace(edit="domain-gate")),
    "gate_examples": (dict(forget_classes=["dog", "car"], forget_domains=["sketch"]),
                      CONFIG.replace(edit="domain-gate")),
}
# real examples of two domains for "gate_examples": 10 + 13 images in batches of 7 (4 batches, 2 per rank;
# one batch spans both domains), one of them held in half precision
_gen = torch.Generator().manual_seed(11)
EXAMPLES = {"gate_examples": {"photo": torch.randn(10, 3, 32, 32, generator=_gen).half(),
                              "sketch": torch.randn(13, 3, 32, 32, generator=_gen)}}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    model, tok = make_tiny_clip(), SimpleTokenizer(context_length=32)
    report = {"world_size": dist.get_world_size()}
    prompts = []                                # the text tower's rows per call, for the gate's prompts
    hook = model.transformer.register_forward_hook(lambda m, a, o: prompts.append(a[0].shape[0]))
    for name, (kw, cfg) in SCENARIOS.items():
        spec = ForgetSpec(CLASSES, DOMAINS, **kw)
        prompts.clear()
        more = dict(domain_examples=EXAMPLES[name]) if name in EXAMPLES else {}
        sharded = forget(model, tok, spec, cfg, **more)
        report[f"{name}.text_rows.rank{rank}"] = sum(prompts)
        if name in EXAMPLES:                    # the image rows the examples cost this rank
            seen = []
            look = model.visual.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
            forget(model, tok, spec, cfg)
            without = sum(seen)
            seen.clear()
            forget(model, tok, spec, cfg, **more)
            look.remove()
            report[f"{name}.example_rows.rank{rank}"] = sum(seen) - without
        sharded.save(out / f"{name}.rank{rank}.safetensors")
        if rank == 0:
            prompts.clear()
            forget(model, tok, spec, cfg, distributed=False, **more).save(out / f"{name}.local.safetensors")
            report[f"{name}.text_rows.local"] = sum(prompts)
    hook.remove()
    (out / f"text_rows.rank{rank}.json").write_text(json.dumps(report))
    # the same request through an explicit process group (same ranks: the call path, not the rank mapping)
    kw, cfg = SCENARIOS["redirect_global"]
    forget(model, tok, ForgetSpec(CLASSES, DOMAINS, **kw), cfg, group=dist.new_group([0, 1])).save(
        out / f"redirect_global.group.rank{rank}.safetensors")
    # evaluate(): each rank scores its share of 23 images (12 and 11), every rank gets the whole matrix
    g = torch.Generator().manual_seed(3)
    images = torch.randn(23, 3, 32, 32, generator=g)
    ci, di = torch.randint(0, 4, (23,), generator=g), torch.randint(0, 3, (23,), generator=g)
    kw = dict(templates=["a {domain} of a {cls}."], batch_size=5)
    acc = evaluate(model, tok, images, ci, di, CLASSES, DOMAINS, **kw)
    # and evaluate_patches(): both states per share, both matrices on every rank
    redirect = Patch.load(out / f"redirect_global.rank{rank}.safetensors")
    both = evaluate_patches(model, tok, redirect, images, ci, di, CLASSES, DOMAINS, **kw)
    with redirect.applied(model):
        after = evaluate(model, tok, images, ci, di, CLASSES, DOMAINS, distributed=False, **kw)
    (out / f"evaluate.rank{rank}.json").write_text(json.dumps(
        {"sharded": acc.correct.tolist(), "total": acc.total.tolist(),
         "local": evaluate(model, tok, images, ci, di, CLASSES, DOMAINS, distributed=False, **kw).correct.tolist(),
         "patches_sharded": [m.correct.tolist() for m in both], "patches_total": both[1].total.tolist(),
         "patches_local_after": after.correct.tolist()}))
    # translate(): 23 images in batches of 7 (4 batches, 2 per rank), each rank moves its own batches and
    # every rank gets every image, the same as one process moves them
    g = torch.Generator().manual_seed(5)
    x = torch.randn(23, 3, 32, 32, generator=g).clamp(-1.5, 1.5)
    text = torch.nn.functional.normalize(torch.randn(12, 32, generator=g), dim=-1)
    target = torch.randint(0, 12, (23,), generator=g)
    seen = []
    hook = model.visual.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    moved = translate(model, x, text, target, 3, CONFIG, World())
    hook.remove()
    local = translate(model, x, text, target, 3, CONFIG)
    (out / f"translate.rank{rank}.json").write_text(json.dumps(
        {"encoded": sum(seen), "max_diff": float((moved - local).abs().max()),
         "moved": float((local - x).abs().max())}))
    # a sharded prototype bank against the local one
    spec = ForgetSpec(CLASSES, DOMAINS, forget_classes=["tree"])
    bank = synthesize_prototypes(model, tok, spec, CONFIG)
    if rank == 0:
        local = synthesize_prototypes(model, tok, spec, CONFIG, distributed=False)
        report["bank_max_diff"] = max(float((bank.images[c] - local.images[c]).abs().max()) for c in spec.cells)
        report["bank_accepted_equal"] = all(torch.equal(bank.accepted[c], local.accepted[c]) for c in spec.cells)
        report["bank_stats"] = [bank.stats, local.stats]
        (out / "report.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
