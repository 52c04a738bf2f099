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


def _released_style_gpt2(folder, seed=0):
    """A miniature of the study's released models: a transformers GPT-2 saved with
    save_pretrained, with its own byte-level BPE (BOS 3, EOS 4) saved beside it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel

    from mlclt_utils.tokenizer import SPECIAL_TOKENS, wrap_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["In the beginning God created the heaven and the earth.",
                             "Au commencement, Dieu créa les cieux et la terre.", "起初，神创造天地。"] * 20,
                            trainer=trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    tokenizer = wrap_tokenizer(tok)
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=24,
                                    vocab_size=tokenizer.vocab_size, bos_token_id=3, eos_token_id=4)).eval()
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return hf, tokenizer


def test_a_released_style_gpt2_loads_as_a_hooked_transformer_with_the_same_logits(tmp_path, monkeypatch):
    from mlclt_utils.models.hub import load_hf_gpt2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf, tokenizer = _released_style_gpt2(tmp_path / "gpt2-hf_multilingual-50")
    model = load_hf_gpt2(str(tmp_path / "gpt2-hf_multilingual-50"))
    assert model.tokenizer.bos_token_id == 3 and model.tokenizer.eos_token_id == 4
    ids = torch.tensor([[3] + tokenizer.encode("Au commencement, Dieu créa", add_special_tokens=False)[:12]])
    with torch.no_grad():
        want = hf(ids).logits
        got = model(ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # unfolded, like the book's own models: the LayerNorms keep their weights
    assert hasattr(model.blocks[0].ln2, "w")


def test_a_missing_hub_model_says_what_is_missing(tmp_path, monkeypatch):
    import pytest

    from mlclt_utils.models.hub import load_hf_gpt2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(OSError, match="CausalNLP/gpt2-hf_multilingual-50.*hub"):
        load_hf_gpt2("CausalNLP/gpt2-hf_multilingual-50")
