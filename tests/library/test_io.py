import json
import os

import pytest
import torch

import vtp
from vit_variants import VARIANTS, make_vit, randomize_gates

X = None


def _x():
    return torch.randn(2, 3, 32, 32, dtype=torch.float64)


def _pruned(variant="deit"):
    model = vtp.add_gates(make_vit(variant))
    randomize_gates(model)
    return vtp.prune(model, vtp.plan(model, ratio=0.5))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_pruned(variant, tmp_path):
    small = _pruned(variant)
    vtp.save(small, tmp_path / "m", metadata={"acc": 0.5})
    loaded = vtp.load(tmp_path / "m")
    x = _x()
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
    assert loaded.vtp_plan == small.vtp_plan
    assert json.loads((tmp_path / "m" / "config.json").read_text())["metadata"] == {"acc": 0.5}


def test_round_trip_dense_and_gated(tmp_path):
    dense = make_vit("layer_scale")
    vtp.save(dense, tmp_path / "dense")
    x = _x()
    torch.testing.assert_close(vtp.load(tmp_path / "dense")(x), dense(x), rtol=0, atol=0)
    gated = vtp.add_gates(make_vit("qk_norm"), sites=("attn_out", "mlp_hidden"))
    randomize_gates(gated)
    vtp.save(gated, tmp_path / "gated")
    loaded = vtp.load(tmp_path / "gated")
    assert set(vtp.gates(loaded)) == set(vtp.gates(gated))
    torch.testing.assert_close(loaded(x), gated(x), rtol=0, atol=0)
    # the pruned copy of a loaded gated model is the same as that of the original
    plan = vtp.plan(gated, ratio=0.3)
    torch.testing.assert_close(vtp.prune(loaded, plan)(x), vtp.prune(gated, plan)(x), rtol=0, atol=0)


def test_save_replaces_previous_save_and_refuses_foreign_directory(tmp_path):
    small = _pruned()
    vtp.save(small, tmp_path / "m")
    vtp.save(small, tmp_path / "m")
    assert sorted(os.listdir(tmp_path)) == ["m"]
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(FileExistsError, match="not a vtp model directory"):
        vtp.save(small, foreign)
    assert os.listdir(foreign) == ["cat.jpg"]


def test_interrupted_save_leaves_nothing_behind(tmp_path, monkeypatch):
    import safetensors.torch

    def broken(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        vtp.save(_pruned(), tmp_path / "m")
    assert os.listdir(tmp_path) == []


def test_truncated_or_altered_files_are_errors(tmp_path):
    small = _pruned()
    target = tmp_path / "m"
    vtp.save(small, target)
    weights = target / "model.safetensors"
    blob = weights.read_bytes()

    weights.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated"):
        vtp.load(target)

    altered = bytearray(blob)
    altered[-5] ^= 0xFF
    weights.write_bytes(bytes(altered))
    with pytest.raises(ValueError, match="SHA-256"):
        vtp.load(target)

    weights.write_bytes(blob)
    config = (target / "config.json").read_text()
    (target / "config.json").write_text(config[: len(config) // 2])
    with pytest.raises(ValueError, match="not valid JSON"):
        vtp.load(target)

    data = json.loads(config)
    data["plan"]["kept"]["blocks.0.mlp_hidden"] = data["plan"]["kept"]["blocks.0.mlp_hidden"][:-1]
    (target / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not fit"):
        vtp.load(target)

    data["architecture"] = "os.system"
    (target / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="architecture"):
        vtp.load(target)

    with pytest.raises(FileNotFoundError, match="config.json"):
        vtp.load(tmp_path / "nowhere")


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(TypeError, match="metadata"):
        vtp.save(make_vit(), tmp_path / "m", metadata={"x": object()})
    with pytest.raises(TypeError, match="metadata: expected a dict"):
        vtp.save(make_vit(), tmp_path / "m", metadata=[("acc", 0.5)])
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("options", [dict(global_pool="avg", pool_include_prefix=True),
                                     dict(dynamic_img_size=True, dynamic_img_pad=True)])
def test_round_trip_keeps_options_that_are_plain_attributes(options, tmp_path):
    from timm.models.vision_transformer import VisionTransformer
    from vit_variants import BASE

    model = vtp.add_gates(VisionTransformer(**{**BASE, **options}).double().eval())
    randomize_gates(model)
    small = vtp.prune(model, vtp.plan(model, ratio=0.5))
    x = torch.randn(2, 3, 36, 36, dtype=torch.float64) if options.get("dynamic_img_pad") else _x()
    for name, m in (("gated", model), ("pruned", small)):
        vtp.save(m, tmp_path / name)
        torch.testing.assert_close(vtp.load(tmp_path / name)(x), m(x), rtol=0, atol=0)


def test_pruned_model_saves_with_the_drop_path_it_is_fine_tuned_with(tmp_path):
    from vtp.app.models import set_drop_path

    small = _pruned("layer_scale")
    set_drop_path(small, 0.2)
    vtp.save(small, tmp_path / "m")
    loaded = vtp.load(tmp_path / "m")
    assert repr(loaded) == repr(small)
    x = _x()
    torch.testing.assert_close(loaded(x), small.eval()(x), rtol=0, atol=0)


def test_pruned_model_with_custom_head_dim_is_refused_with_type_error(tmp_path):
    from timm.models.vision_transformer import Attention, VisionTransformer
    from vit_variants import BASE

    model = VisionTransformer(**BASE).double().eval()
    for block in model.blocks:
        block.attn = Attention(48, num_heads=3, attn_head_dim=8, qkv_bias=True).double()
    vtp.add_gates(model)
    small = vtp.prune(model, vtp.plan(model, ratio=0.5))
    with pytest.raises(TypeError, match="cannot be described"):
        vtp.save(small, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_run_time_switches_do_not_block_saving(tmp_path):
    from timm.models.vision_transformer import VisionTransformer
    from vit_variants import BASE

    model = vtp.add_gates(make_vit("distilled"))
    model.set_grad_checkpointing(True)
    model.set_distilled_training(True)
    model.blocks[0].attn.fused_attn = not model.blocks[0].attn.fused_attn
    vtp.save(model, tmp_path / "distilled")
    vtp.save(VisionTransformer(**BASE, fix_init=True, init_values=0.1), tmp_path / "fix_init")
    x = _x()
    torch.testing.assert_close(vtp.load(tmp_path / "distilled")(x), model.eval()(x), rtol=1e-12, atol=1e-12)


def test_a_save_killed_between_its_renames_leaves_the_old_model(tmp_path, monkeypatch):
    """Replacing a directory takes two renames; a kill between them leaves the old save under
    a temporary name, which the next load (or save) puts back."""
    import vtp.atomic as atomic

    small = _pruned()
    vtp.save(small, tmp_path / "m", metadata={"n": 1})
    real_rename = os.rename
    calls = []

    def rename_then_die(src, dst):
        calls.append(dst)
        if len(calls) >= 2:  # dead after the old directory moved aside: nothing runs any more
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        vtp.save(small, tmp_path / "m", metadata={"n": 2})
    monkeypatch.setattr(atomic.os, "rename", real_rename)
    assert not (tmp_path / "m").exists()
    assert vtp.read_config(tmp_path / "m").metadata == {"n": 1}
    assert not [p for p in os.listdir(tmp_path) if ".old-" in p]


def _dead_pid() -> int:
    """The id of a process that has just exited (ids are not reused that fast)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_temporaries_of_killed_writes_go_with_the_next_write(tmp_path):
    """A write killed outright (SIGKILL) cannot remove its temporary sibling: the next write
    of the same target does, remove_interrupted_writes tidies a whole folder, and a
    directory a replacement had moved aside goes back in place. Temporaries of writes still
    running (another live process's) are left alone."""
    import vtp.atomic as atomic

    dead = _dead_pid()

    def leave(name: str, folder: bool = False):
        path = tmp_path / name
        path.mkdir() if folder else path.write_text("half")
        return path

    stale = leave(f".a.json.tmp-{dead}-0123abcd")
    reused = leave(f".a.json.tmp-{os.getpid()}-89abcdef")  # this process's id, not being written
    running = leave(f".a.json.tmp-{os.getppid()}-00000000")  # a live process's write
    other = leave(f".b.json.tmp-{dead}-11111111")
    atomic.write_json(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert not stale.exists() and not reused.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["a.json", running.name, other.name])

    # killed between the two renames of replacing m/: the old m/ aside, the new one half-done
    old = leave(f".m.old-{dead}-22222222", folder=True)
    (old / "w").write_text("old")
    half = leave(f".m.tmp-{dead}-33333333", folder=True)
    removed = atomic.remove_interrupted_writes(tmp_path)
    assert sorted(p.name for p in removed) == sorted([other.name, half.name])
    assert (tmp_path / "m" / "w").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == sorted(["a.json", running.name, "m"])

    # killed after the second rename, before the old directory was deleted
    leftover = leave(f".m.old-{dead}-44444444", folder=True)
    atomic.replace_directory(tmp_path / "m", lambda d: (d / "w").write_text("new"))
    assert (tmp_path / "m" / "w").read_text() == "new" and not leftover.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["a.json", running.name, "m"])


def test_save_refuses_a_directory_of_someone_elses_config(tmp_path):
    folder = tmp_path / "hf_model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(FileExistsError, match="not a vtp model directory"):
        vtp.save(make_vit(), folder)
    assert os.listdir(folder) == ["config.json"]


def test_weights_file_must_be_the_one_save_wrote(tmp_path):
    vtp.save(make_vit(), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    config = json.loads(path.read_text())
    config["weights"]["file"] = "../elsewhere.safetensors"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="weights.file: expected 'model.safetensors'"):
        vtp.load(tmp_path / "m")
