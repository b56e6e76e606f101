"""`make demo` end to end on the embedded proving-ground model, with few held-out renders."""
import pytest

from clipforget_fast import Patch


def _demo():
    # imported here, not at collection: the proving ground imports open_clip, which imports Triton,
    # and test_kernels.py must be the first to import Triton (under its interpreter) on a CPU machine
    from clipforget_fast import demo
    return demo


def test_demo_writes_heatmaps_and_patches_that_forget(tmp_path, capsys):
    assert _demo().main(["--out", str(tmp_path), "--per-cell", "2"]) == 0
    text = capsys.readouterr().out
    for tag in ("global", "domain"):
        assert (tmp_path / f"{tag}_heatmap.png").stat().st_size > 0
        assert Patch.load(tmp_path / f"{tag}_patch.safetensors").entries
    assert "[global] forget 5 cell(s)" in text and "[domain] forget 1 cell(s)" in text
    # the default edit, as the demo's comment says: the class redirect for the global request, the
    # domain gate for the domain request
    assert "edit='class-redirect'" in text.split("[global]")[1].splitlines()[0]
    assert "edit='domain-gate'" in text.split("[domain]")[1].splitlines()[0]
    # the global patch (class redirect, which meets the global targets) takes fish down everywhere
    line = next(l for l in text.splitlines() if l.startswith("forgotten cells"))
    before, after = (float(x.rstrip("%")) for x in line.split()[2:5:2])
    assert before > 50 and after < 10, line


def test_demo_names_a_bad_class(tmp_path):
    with pytest.raises(SystemExit, match="unknown class 'unicorn'"):
        _demo().main(["--out", str(tmp_path), "--forget-class", "unicorn"])


@pytest.mark.parametrize("per_cell", ["0", "-3"])
def test_demo_refuses_no_images_per_cell(tmp_path, capsys, per_cell):
    with pytest.raises(SystemExit) as e:
        _demo().main(["--out", str(tmp_path), "--per-cell", per_cell])
    assert e.value.code == 2 and f"--per-cell: {per_cell!r}: must be ≥ 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
