import pytest
import torch

from mlclt_utils.artifacts import ManifestMismatch, Stage, atomic_path, load_tensors, save_tensors


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.bin"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_tensors_round_trip(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    save_tensors(tmp_path / "t.safetensors", t)
    back = load_tensors(tmp_path / "t.safetensors")
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])


def test_stage_lifecycle_and_mismatch(tmp_path):
    up = Stage("r", "corpus", tmp_path)
    up.start()
    assert not up.is_complete()
    up.finish({"n": 1})
    down = Stage("r", "tokenizer", tmp_path)
    down.start()
    down.finish({"v": 10}, inputs=[up])
    assert down.matches({"v": 10}) and not down.matches({"v": 11})
    down.require({"v": 10})
    with pytest.raises(ManifestMismatch, match="keys that differ: \\['v'\\]"):
        down.require({"v": 11})
    # rebuilding the upstream stage invalidates the downstream one, by name
    up.start()
    up.finish({"n": 2})
    with pytest.raises(ManifestMismatch, match="expects input 'corpus'"):
        down.require({"v": 10})
    assert not down.matches({"v": 10})
    with pytest.raises(ManifestMismatch, match="missing or incomplete"):
        Stage("r", "nothing", tmp_path).manifest()


def test_bad_run_name(tmp_path):
    with pytest.raises(ValueError, match="run name"):
        Stage("../x", "corpus", tmp_path)
