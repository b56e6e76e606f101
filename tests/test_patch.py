"""Patch mathematics, reversibility, persistence and refusal of the wrong model."""
import json

import pytest
import torch

from clipforget_fast import Patch, PatchEntry
from clipforget_fast.pipeline import _patch_entry
from clipforget_fast.layers import find_layers
from clipforget_fast.patch import process_umask, tensor_hash

from conftest import make_tiny_clip


def _random_patch(model, targets="proj+mlp+attn", k=3, alpha=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    entries = []
    for layer in find_layers(model, targets, last_blocks=1):
        U, _ = torch.linalg.qr(torch.randn(layer.d_in, k, generator=g))
        entries.append(_patch_entry(layer, U, alpha))
    return Patch(entries)


def test_all_three_layouts_annihilate_the_forget_directions(tiny_clip):
    m = tiny_clip
    layers = find_layers(m, "proj+mlp+attn", last_blocks=1)
    assert {l.layout for l in layers} == {"linear", "in_out"}
    assert {l.kind for l in layers} == {"proj", "mlp", "attn_in"}
    before = {l.name: l.weight_out_in().detach().clone() for l in layers}
    patch = _random_patch(m)
    patch.apply(m)
    for e, layer in zip(patch.entries, layers):
        W0, W1 = before[layer.name], layer.weight_out_in().detach()
        assert torch.linalg.norm(W1 @ e.B) <= 1e-5 * torch.linalg.norm(W0)
        # directions orthogonal to B are untouched
        v = torch.randn(layer.d_in)
        v = v - e.B @ (e.B.t() @ v)
        assert torch.linalg.norm(W1 @ v - W0 @ v) <= 1e-5 * torch.linalg.norm(W0 @ v)


def test_half_alpha_halves(tiny_clip):
    layer = find_layers(tiny_clip, "proj")[0]
    W0 = layer.weight_out_in().detach().clone()
    patch = _random_patch(tiny_clip, "proj", alpha=0.5)
    patch.apply(tiny_clip)
    B = patch.entries[0].B
    torch.testing.assert_close(layer.weight_out_in().detach() @ B, 0.5 * (W0 @ B), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float16, 2 ** -10), (torch.bfloat16, 2 ** -7)])
def test_apply_revert_restores_within_dtype_rounding(dtype, tol):
    m = make_tiny_clip().to(dtype)
    patch = _random_patch(m)
    names = [e.name for e in patch.entries]
    params = dict(m.named_parameters())
    before = {n: params[n].detach().clone() for n in names}
    patch.apply(m)
    assert any(not torch.equal(params[n], before[n]) for n in names)
    patch.revert(m)
    for n in names:
        w0, w1 = before[n].float(), params[n].detach().float()
        # one rounding per apply and per revert: |error| ≤ 2 ulp of the larger of the weight and the update
        upd = (patch.entries[names.index(n)].A.abs().max() * 1.0).item()
        bound = 2 * tol * (w0.abs() + upd) + 1e-7
        assert ((w1 - w0).abs() <= bound).all(), n


def test_save_load_round_trip(tmp_path, tiny_clip):
    patch = _random_patch(tiny_clip)
    patch.spec, patch.config, patch.info = {"mode": "global"}, {"alpha": 1.0}, {"timings": {"capture": 0.1}}
    path = patch.save(tmp_path / "p.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]
    again = Patch.load(path)
    assert [e.name for e in again.entries] == [e.name for e in patch.entries]
    for a, b in zip(again.entries, patch.entries):
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
        assert a.layout == b.layout and a.base_hash == b.base_hash and a.cast_hashes == b.cast_hashes
        assert sorted(a.cast_hashes) == ["bfloat16", "float16"]
    assert again.spec == patch.spec and again.config == patch.config and again.timings == {"capture": 0.1}
    again.apply(tiny_clip)                        # hashes match the model it was computed on


def test_refuses_other_weights_unless_forced(tiny_clip):
    patch = _random_patch(tiny_clip)
    other = make_tiny_clip(seed=1)
    with pytest.raises(ValueError, match="hash mismatch"):
        patch.apply(other)
    p = dict(other.named_parameters())[patch.entries[0].name]
    before = p.detach().clone()
    with pytest.raises(ValueError):
        patch.apply(other)
    assert torch.equal(p, before)                 # nothing half-applied
    patch.apply(other, force=True)
    assert not torch.equal(p, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_patch_computed_on_fp32_weights_applies_to_them_in_half_precision(tmp_path, dtype):
    """The patch records its fp32 weights' half-precision casts' hashes: the same weights held in fp16 or
    bf16 take it unforced (also from disk), and get the fp32 result rounded once; other weights in that
    dtype are still refused, and a patch computed on half weights knows no casts."""
    model = make_tiny_clip()
    patch = Patch.load(_random_patch(model).save(tmp_path / "p.safetensors"))
    half = make_tiny_clip().to(dtype)
    base = {e.name: dict(model.named_parameters())[e.name].detach().clone() for e in patch.entries}
    with patch.applied(model):
        want = {e.name: dict(model.named_parameters())[e.name].detach().clone() for e in patch.entries}
    patch.apply(half)
    ulp = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    for name, w in want.items():
        got = dict(half.named_parameters())[name].detach().float()
        # the base rounded to the dtype, then the sum rounded once: ≤ 1 ulp of each
        bound = ulp * (base[name].abs() + w.abs()) * (1 + 2 * ulp) + 1e-7
        assert ((got - w).abs() <= bound).all(), name
    patch.revert(half)
    other = make_tiny_clip(seed=1).to(dtype)
    with pytest.raises(ValueError, match="hash mismatch"):
        patch.apply(other)
    on_half = _random_patch(make_tiny_clip().to(dtype))
    assert all(e.cast_hashes == {} for e in on_half.entries)
    with pytest.raises(ValueError, match="hash mismatch"):
        on_half.apply(make_tiny_clip())
    with pytest.raises(ValueError, match="its float64 weights are not recognized: the patch knows its weights in "
                                         "float32 and as bfloat16, float16"):
        patch.apply(make_tiny_clip().double())


def test_refuses_wrong_shapes_and_missing_layers(tiny_clip):
    patch = _random_patch(tiny_clip)
    bigger = make_tiny_clip(width=96)
    with pytest.raises(ValueError, match="expects shape"):
        patch.apply(bigger, force=True)
    bad = Patch([PatchEntry("visual.nope", "linear", torch.zeros(2, 1), torch.zeros(2, 1), "x")])
    with pytest.raises(ValueError, match="visual.nope"):
        bad.apply(tiny_clip)


def test_revert_order_is_enforced(tiny_clip):
    p1 = _random_patch(tiny_clip, seed=1)
    p1.apply(tiny_clip)
    p2 = _random_patch(tiny_clip, seed=2)         # computed on the patched model
    p2.apply(tiny_clip)
    with pytest.raises(ValueError, match="last one applied"):
        p1.revert(tiny_clip)
    p2.revert(tiny_clip)
    p1.revert(tiny_clip)


def test_a_reverted_patch_applies_again(tiny_clip):
    patch = _random_patch(tiny_clip, seed=3)
    base = {n: p.detach().clone() for n, p in tiny_clip.named_parameters()}
    for _ in range(2):                            # apply, revert, apply again: no force needed
        patch.apply(tiny_clip)
        patch.revert(tiny_clip)
    other = _random_patch(tiny_clip, seed=4)      # computed on the reverted weights: its own base
    other.apply(tiny_clip)
    with pytest.raises(ValueError, match="hash mismatch"):
        patch.apply(tiny_clip)                    # the weights are neither its base nor its revert's
    other.revert(tiny_clip)
    with torch.no_grad():                         # weights changed after the revert: refused
        name = patch.entries[0].name
        dict(tiny_clip.named_parameters())[name].add_(1.0)
        with pytest.raises(ValueError, match="hash mismatch"):
            patch.apply(tiny_clip)
        for n, p in tiny_clip.named_parameters():
            p.copy_(base[n])


def test_applied_block_restores_bit_for_bit(tiny_clip):
    from clipforget_fast.patch import applied_patches

    patch = _random_patch(tiny_clip, seed=5)
    base = {n: p.detach().clone() for n, p in tiny_clip.named_parameters()}
    name = patch.entries[0].name
    with patch.applied(tiny_clip):
        assert applied_patches(tiny_clip) == [patch]
        assert not torch.equal(dict(tiny_clip.named_parameters())[name], base[name])
    assert applied_patches(tiny_clip) == []
    for n, p in tiny_clip.named_parameters():
        assert torch.equal(p, base[n]), n           # exact, not up to rounding
    with pytest.raises(RuntimeError, match="inside"):
        with patch.applied(tiny_clip):
            raise RuntimeError("inside")
    for n, p in tiny_clip.named_parameters():
        assert torch.equal(p, base[n]), n
    patch.apply(tiny_clip)                           # the block left the patch free to apply again
    patch.revert(tiny_clip)


def test_bad_paths_and_files(tmp_path, tiny_clip):
    patch = _random_patch(tiny_clip, "proj")
    with pytest.raises(ValueError, match="safetensors"):
        patch.save(tmp_path / "p.bin")
    with pytest.raises(ValueError, match="does not exist"):
        patch.save(tmp_path / "missing" / "p.safetensors")
    with pytest.raises(ValueError, match="no patch file"):
        Patch.load(tmp_path / "none.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        Patch.load(junk)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a clipforget patch"):
        Patch.load(tmp_path / "plain.safetensors")


@pytest.mark.parametrize("damage, why", [
    (lambda h, t: "{not json", "not JSON"),
    (lambda h, t: json.dumps([1]), "not a JSON object"),
    (lambda h, t: json.dumps({k: v for k, v in h.items() if k != "entries"}), "no list of entries"),
    (lambda h, t: json.dumps({**h, "entries": [{**h["entries"][0], "layout": "inout"}]}), "layout 'inout'"),
    (lambda h, t: (t.pop(next(k for k in t if k.startswith("A::"))), json.dumps(h))[1], "lacks its A or B"),
    (lambda h, t: json.dumps({**h, "info": [1]}), "not a mapping"),
])
def test_a_damaged_patch_file_is_named(tmp_path, tiny_clip, damage, why):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = _random_patch(tiny_clip, "proj").save(tmp_path / "p.safetensors")
    with safe_open(str(path), framework="pt") as f:
        header, tensors = json.loads(f.metadata()["clipforget"]), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={"clipforget": damage(header, tensors)})
    with pytest.raises(ValueError, match=why) as err:
        Patch.load(path)
    assert "p.safetensors" in str(err.value)


def test_hash_sees_dtype_shape_and_values():
    a = torch.arange(6.0).view(2, 3)
    assert tensor_hash(a) == tensor_hash(a.clone())
    assert tensor_hash(a) != tensor_hash(a.view(3, 2))
    assert tensor_hash(a) != tensor_hash(a.half())
    b = a.clone(); b[0, 0] = 1e-8
    assert tensor_hash(a) != tensor_hash(b)


def test_process_umask_reads_the_current_umask():
    import os

    old = os.umask(0o027)
    try:
        assert process_umask() == 0o027
        os.umask(0o002)
        assert process_umask() == 0o002
    finally:
        os.umask(old)


def _stack(model, tmp_path=None):
    """p1 computed on ``model``, p2 computed on it with p1 applied (both reverted again)."""
    p1 = _random_patch(model, seed=11)
    p1.apply(model)
    p2 = _random_patch(model, seed=12)
    p1.revert(model)
    return p1, p2


def test_a_stacked_patch_records_what_lies_under_it(tiny_clip, tmp_path):
    p1, p2 = _stack(tiny_clip)
    for a, b in zip(p1.entries, p2.entries):
        assert a.under == () and a.root == a.base_hash
        assert b.under == (p1.key,) and b.root == a.root and b.base_hash != a.base_hash
    again = Patch.load(p2.save(tmp_path / "p2.safetensors"))
    assert again.key == p2.key and [(e.root, e.under) for e in again.entries] == [(e.root, e.under)
                                                                                 for e in p2.entries]
    assert p2.only("image").key == p2.key


def test_a_stack_applies_again_after_reverting_it(tiny_clip):
    """W + ΔW - ΔW is W up to rounding: the stack's marks, not the bits, let it apply again."""
    p1, p2 = _stack(tiny_clip)
    for _ in range(2):
        p1.apply(tiny_clip)
        p2.apply(tiny_clip)
        p2.revert(tiny_clip)
        p1.revert(tiny_clip)


def test_a_stack_applies_over_other_rounding(tiny_clip, monkeypatch, tmp_path):
    """p1 applied by a path that rounds otherwise (another backend): p2 still takes the weights, and a
    loaded copy of a reverted patch takes the weights its revert left."""
    p1, p2 = _stack(tiny_clip)
    from clipforget_fast import dispatch

    def rounded_otherwise(ws, ls, rs, scale=1.0):
        for w, l, r in zip(ws, ls, rs):
            w.copy_((w.double() + scale * (l.double() @ r.double().t())).to(w.dtype))

    with monkeypatch.context() as m:
        m.setattr(dispatch, "lowrank_update_", rounded_otherwise)
        p1.apply(tiny_clip)
    p2.apply(tiny_clip)
    p2.revert(tiny_clip)
    p1.revert(tiny_clip)
    copy = Patch.load(p1.save(tmp_path / "p1.safetensors"))
    copy.apply(tiny_clip)
    p2.apply(tiny_clip)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_stack_computed_on_fp32_applies_to_the_half_precision_copy(dtype):
    p1, p2 = _stack(make_tiny_clip())
    half = make_tiny_clip().to(dtype)
    p1.apply(half)
    p2.apply(half)
    p2.revert(half)
    p1.revert(half)


def test_a_stack_refuses_weights_written_otherwise(tiny_clip):
    p1, p2 = _stack(tiny_clip)
    with pytest.raises(ValueError, match="hash mismatch"):
        p2.apply(tiny_clip)                       # p1 is not under it
    p1.apply(tiny_clip)
    tiny_clip.load_state_dict(tiny_clip.state_dict())     # the same values, written anew: the mark is stale
    p2.apply(tiny_clip)                           # ... but the bits are p2's base
    p2.revert(tiny_clip)
    p1.revert(tiny_clip)
    from clipforget_fast.patch import mark_of

    params = dict(tiny_clip.named_parameters())
    assert all(mark_of(params[e.name])[:2] == (e.root, ()) for e in p1.entries)     # reverted: the bare root
    other = _random_patch(tiny_clip, seed=13)
    other.apply(tiny_clip, force=True)            # forced: what the weights hold is not known
    assert all(mark_of(params[e.name]) is None for e in other.entries)
    with pytest.raises(ValueError, match="hash mismatch"):
        p1.apply(tiny_clip)
    other.revert(tiny_clip)
    assert all(mark_of(params[e.name]) is None for e in other.entries)
