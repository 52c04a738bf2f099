"""Concept mining, cloze prompts and the prompt file format, on constructed data."""

import json
import random
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from mlclt_utils import prompts as P

PLANTED = {"God": {"en": "God", "fr": "Dieu", "zh": "上帝"},
           "water": {"en": "water", "fr": "eau", "zh": "水"},
           "king": {"en": "king", "fr": "roi", "zh": "王"}}


def planted_units(n=60, seed=0):
    """Aligned units: each concept occurs in its own random third of the units, in every
    language; the rest is filler drawn independently per language."""
    rng = random.Random(seed)
    filler = {"en": [f"w{i}" for i in range(30)], "fr": [f"m{i}" for i in range(30)],
              "zh": list("的了在是我有他这中大来上国个到说们为子和你地出道也时年")}
    present = {c: {i for i in range(n) if rng.random() < 0.35} for c in PLANTED}
    units = {lang: [] for lang in filler}
    for i in range(n):
        for lang, words in filler.items():
            parts = rng.sample(words, 8)
            for c, where in present.items():
                if i in where:
                    parts.insert(rng.randrange(len(parts) + 1), PLANTED[c][lang])
            units[lang].append(("" if lang == "zh" else " ").join(parts))
    return units


def test_mining_recovers_a_planted_translation_table():
    table = P.mine_concepts(planted_units(), seeds={c: w["en"] for c, w in PLANTED.items()},
                            seed_language="en")
    for concept, words in PLANTED.items():
        for lang, word in words.items():
            assert table.loc[concept, lang] == word          # the spelling found in the text
        assert table.loc[concept, "score_fr"] > 0.9


def test_mining_refuses_unaligned_units_and_missing_seeds():
    units = planted_units()
    with pytest.raises(ValueError, match="aligned"):
        P.mine_concepts({"en": units["en"], "fr": units["fr"][:-1]})
    with pytest.raises(ValueError, match="seed lists exist"):
        P.mine_concepts({"de": ["a"], "zh": ["b"]})
    # a seed word too rare is dropped, not guessed
    table = P.mine_concepts(units, seeds={"God": "God", "nothing": "absent"}, seed_language="en")
    assert list(table.index) == ["God"]


def test_cloze_prompts_keep_only_what_the_model_predicts():
    from test_clt_formats import tiny_tokenizer

    tok = tiny_tokenizer()
    concepts = pd.DataFrame({"en": ["w9"]}, index=pd.Index(["nine"], name="concept"))
    verses = {"en": ["w4 w5 w6 w7 w9 w8", "w4 w5 w6 w7 w8 w9", "w9 w4"]}
    keys = ["1:1:1", "1:1:2", "1:1:3"]
    wanted = tok.convert_tokens_to_ids("w9")

    class Model:
        cfg = SimpleNamespace(n_ctx=16, device="cpu")
        tokenizer = tok

        def __call__(self, tokens):                  # predicts w9 only after w7
            logits = torch.zeros(tokens.shape[0], tokens.shape[1], 40)
            last = tokens[0, -1].item()
            logits[0, -1, wanted if last == tok.convert_tokens_to_ids("w7") else 5] = 1.0
            return logits

    out = P.cloze_prompts(Model(), concepts, verses, keys, per_concept=2, min_chars=4)
    assert list(out["verse"]) == ["1:1:1", "1:1:2"]   # the answered one first; verse 3 is too short
    assert list(out["answered"]) == [True, False]
    row = out.iloc[0]
    assert row["prompt"] == "w4 w5 w6 w7" and row["target"] == " w9"
    assert row["target_token"] == wanted and out.iloc[0]["p_target"] > out.iloc[1]["p_target"]
    assert list(P.cloze_prompts(Model(), concepts, verses, keys, per_concept=1, min_chars=4)["verse"]) == ["1:1:1"]


def test_prompt_files_round_trip_and_name_the_bad_line(tmp_path):
    good = [{"prompt": "In the beginning", "language": "en", "target": " God"},
            {"prompt": "Au commencement", "language": "fr"}]
    path = P.write_prompts(tmp_path / "p.jsonl", good)
    assert P.read_prompts(path) == good
    lines = [json.dumps(good[0]), "", json.dumps({"prompt": "x", "language": "xx"})]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl line 3: field 'language'.*'xx'"):
        P.read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"language": "en"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1: field 'prompt' is missing"):
        P.read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": 3, "language": "en"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 1: field 'prompt' must be a string"):
        P.read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "language": "en"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: not valid JSON"):
        P.read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="does not exist"):
        P.read_prompts(tmp_path / "none.jsonl")


def test_prompts_from_a_local_hf_dataset_with_a_column_mapping(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"text": ["The opposite of hot is", "Le contraire de chaud est"], "lang": ["en", "fr"],
            "answer": [" cold", " froid"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    got = P.prompts_from_hf(str(tmp_path / "ds"), {"prompt": "text", "language": "lang", "target": "answer"})
    assert got == [{"prompt": "The opposite of hot is", "language": "en", "target": " cold"},
                   {"prompt": "Le contraire de chaud est", "language": "fr", "target": " froid"}]
    with pytest.raises(ValueError, match=r"no column \['question'\]"):
        P.prompts_from_hf(str(tmp_path / "ds"), {"prompt": "question", "language": "lang"})
    with pytest.raises(ValueError, match="not both"):
        P.prompts_from_hf(str(tmp_path / "ds"), {"prompt": "text", "language": "lang"}, language="en")
    bad = dict(rows, lang=["en", "xx"])
    datasets.Dataset.from_dict(bad).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"row 1: field 'language'"):
        P.prompts_from_hf(str(tmp_path / "bad"), {"prompt": "text", "language": "lang"})


def test_same_verse_prompts_cut_every_language_from_one_verse():
    from test_clt_formats import tiny_tokenizer

    tok = tiny_tokenizer()
    concepts = pd.DataFrame({"en": ["w9"], "fr": ["w8"]}, index=pd.Index(["c"], name="concept"))
    # verse 2 holds the word in both languages, verse 1 in English only (and is answered there)
    verses = {"en": ["w4 w5 w6 w7 w9", "w4 w5 w6 w5 w9"], "fr": ["w4 w5 w6 w7 w5", "w4 w5 w6 w4 w8"]}
    keys = ["1:1:1", "1:1:2"]

    class Model:
        cfg = SimpleNamespace(n_ctx=16, device="cpu")
        tokenizer = tok

        def __call__(self, tokens):
            logits = torch.zeros(tokens.shape[0], tokens.shape[1], 40)
            logits[0, -1, tok.convert_tokens_to_ids("w9")] = 1.0
            return logits

    out = P.cloze_prompts(Model(), concepts, verses, keys, per_concept=1, min_chars=4, same_verse=True)
    assert list(out["verse"]) == ["1:1:2", "1:1:2"] and list(out["language"]) == ["en", "fr"]
    alone = P.cloze_prompts(Model(), concepts, verses, keys, per_concept=1, min_chars=4)
    assert set(alone["verse"]) == {"1:1:1", "1:1:2"}          # per language, the answered verse first
