"""Hub loading code, run on local copies in the hub's layout (no network)."""

import sys
import types

import torch

from mlclt_utils.clt.formats import load_featflow_clt_from_hub, save_featflow_clt
from mlclt_utils.clt.model import CLTConfig, CrossLayerTranscoder


def test_featflow_clt_from_a_hub_snapshot_with_subfolders(tmp_path, monkeypatch):
    snapshot = tmp_path / "snapshot"
    clts = {}
    for name, seed in (("clt_a", 0), ("clt_b", 1)):
        clt = CrossLayerTranscoder(CLTConfig(2, 8, 12), generator=torch.Generator().manual_seed(seed))
        save_featflow_clt(clt, snapshot / name)
        clts[name] = clt
    calls = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(snapshot)

    monkeypatch.setitem(sys.modules, "huggingface_hub",
                        types.SimpleNamespace(snapshot_download=snapshot_download))
    loaded = load_featflow_clt_from_hub("someone/clts", subfolder="clt_b/", revision="v1")
    assert calls == [("someone/clts", "v1", ["clt_b/*"])]
    x = torch.randn(5, 2, 8)
    want = clts["clt_b"].encode(x)
    assert torch.allclose(loaded.encode(x), want, atol=1e-5)
    assert not torch.allclose(clts["clt_a"].encode(x), want)
