"""Shared fixtures: a real chain of stages at a micro size (two languages, a 2-layer model
of width 32, a CLT of 32 features per layer), built once per test session with the same
driver the chapters use."""

import shutil

import pytest

from mlclt_utils.presets import load_preset
from mlclt_utils.stages import build

MICRO = {
    "corpus.languages": ["en", "fr"], "corpus.max_documents_per_language": 30,
    "tokenizer.vocab_size": 400, "tokenizer.sample_chars_per_language": 20_000,
    "mixtures.english_shares": [0.5], "models.n_ctx": 32,
    "models.sizes": {"s": {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_mlp": 64}},
    "training.tokens": 16 * 32 * 12, "training.batch_size": 16, "training.eval_every": 4,
    "training.eval_tokens_per_language": 512, "training.n_checkpoints": 3,
    "clt.features_per_layer": 32, "clt.train_tokens": 2048, "clt.batch_tokens": 128,
    "clt.buffer_tokens": 512, "clt.eval_tokens": 512, "clt.n_checkpoints": 2,
    "clt.dead_window_tokens": 1024,
}
RUN = "micro"
# every stage of the micro chain, in build order
CHAIN = [("corpus", None), ("tokenizer", None), ("data", "en50"), ("models", "s-en50"),
         ("clt", "s-en50"), ("clt_eval", "s-en50")]


def micro_preset(**changes):
    return load_preset("tiny", {**MICRO, **changes})


@pytest.fixture(scope="session")
def micro():
    return micro_preset()


@pytest.fixture(scope="session")
def micro_chain(tmp_path_factory, micro):
    """Artifact root holding the whole micro chain (read-only: copy it to change it)."""
    root = tmp_path_factory.mktemp("micro_chain")
    for kind, key in CHAIN:
        build(kind, micro, RUN, key, root, progress=False)
    return root


@pytest.fixture
def chain_copy(micro_chain, tmp_path):
    """A private copy of the micro chain, free to rebuild or break."""
    root = tmp_path / "artifacts"
    shutil.copytree(micro_chain, root)
    return root
