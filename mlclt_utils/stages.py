"""The stage mechanism: every artifact of the chain is built, checked and loaded here.

A *stage kind* declares its name, the chapter that builds it, the slice of the preset it
depends on (``config``), its upstream stages, how it builds and how it loads. Stages live
at ``<root>/<run>/<kind>`` or ``<root>/<run>/<kind>/<key>`` (``data/en50``,
``models/s-en50``, ``clt/s-en50``); :func:`stage` is the one place that makes that path.

One driver does the rest for every kind:

* **skip if current**: a stage built from the same config and the same upstream stages
  (by identity, see ``artifacts``) is not built again;
* **refuse stale upstream stages**: before building or loading, every upstream stage is
  checked, recursively, against the config *this* run asks for. One built under another
  config, from other inputs, or never built raises :class:`StaleStage`, which names the
  stage, the keys that differ and the command that rebuilds it. Nothing is ever built on
  an upstream stage that does not match;
* **in-progress marker and resume**: ``in_progress.json`` is written before the build
  starts and removed after the manifest; the manifest is written last, so a killed build
  never looks complete. A rerun of a resumable kind (training) with the same config and
  inputs keeps the folder and resumes; any other rerun starts clean;
* **torchrun**: for kinds that train, every rank runs the build, only rank 0 writes the
  bookkeeping files;
* **the command line**:

      python -m mlclt_utils.stages status --preset tiny
      python -m mlclt_utils.stages build models/s-en50 --preset tiny --set training.tokens=2e5
      torchrun --standalone --nproc_per_node 2 -m mlclt_utils.stages build clt/s-en50 --preset small

Later chapters add their kinds with :func:`register`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from . import distributed
from .artifacts import (IN_PROGRESS_FILE, METRICS_FILE, RESUME_FILE, ManifestMismatch, Stage, atomic_path,
                        config_hash, read_json, read_jsonl, write_json)
from .presets import (BILINGUAL_SUFFIX, bilingual_preset, diffing_base, load_preset, mixture_name,
                      mixture_share, model_names, parse_override, reference_model, size_models)


class StaleStage(ManifestMismatch):
    """An upstream stage is missing, unfinished, or built under another config or inputs."""


class Incomplete:
    """Returned by a build that stopped early on purpose (e.g. ``max_steps_this_call``):
    the stage keeps its resume state and is not marked complete."""


INCOMPLETE = Incomplete()


@dataclass
class BuildContext:
    """What a kind's ``build`` gets: the preset, the stage folder to fill and its config."""

    preset: dict
    run: str
    key: str | None
    root: Any
    stage: Stage
    config: dict
    device: str | None = None
    progress: bool = True
    options: dict = field(default_factory=dict)
    is_main: bool = True

    def input(self, kind: str, key: str | None = None, **kwargs):
        """Load an upstream stage (already checked current by the driver)."""
        return KINDS[kind].load(stage(kind, self.run, key, self.root), **kwargs)


@dataclass(frozen=True)
class StageKind:
    name: str
    chapter: str                                         # notebook NN that builds it
    config: Callable[[Mapping, str | None], dict]        # the preset slice it depends on
    upstream: Callable[[Mapping, str | None], list]      # [(kind, key), ...]
    build: Callable[[BuildContext], Any]                 # fills ctx.stage; returns manifest extras
    load: Callable[..., Any]                             # load(stage, **kwargs)
    keys: Callable[[Mapping], list[str]] | None = None   # allowed keys (None: a kind without key)
    resumable: bool = False                              # keep the folder of a killed build
    distributed: bool = False                            # runs on every torchrun rank
    volatile: tuple[str, ...] = ()                       # files left out of the identity


KINDS: dict[str, StageKind] = {}


def register(kind: StageKind) -> StageKind:
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> StageKind:
    if name not in KINDS:
        raise ValueError(f"unknown stage kind {name!r}; kinds: {', '.join(KINDS)}")
    return KINDS[name]


def _preset(preset) -> dict:
    return load_preset(preset) if isinstance(preset, str) else preset


def stage(kind: str, run: str, key: str | None = None, root=None) -> Stage:
    """The stage folder of ``kind`` (and ``key``) in ``run``: the only place paths are made."""
    k = get_kind(kind)
    if (key is None) != (k.keys is None):
        raise ValueError(f"stage kind {kind!r} " + ("takes no key" if k.keys is None
                                                      else "needs a key, e.g. a model name"))
    return Stage(run, kind if key is None else f"{kind}/{key}", root)


def _check_key(kind: StageKind, preset: Mapping, key: str | None) -> None:
    if kind.keys is not None:
        allowed = kind.keys(preset)
        if key not in allowed:
            raise ValueError(f"stage {kind.name!r}: {key!r} is not one of this preset's "
                             f"{allowed}")


def _flat(d: Any, prefix: str = "") -> dict:
    if not isinstance(d, Mapping):
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def config_diff(built: Mapping, asked: Mapping) -> list[str]:
    """``["training.tokens: built with 400000, asked for 100000", ...]``."""
    a, b = _flat(built), _flat(asked)
    return [f"{k}: built with {a.get(k, '(absent)')!r}, asked for {b.get(k, '(absent)')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def rebuild_command(kind: str, preset: Mapping, run: str) -> str:
    """The runner command that rebuilds ``kind`` (its chapter) under this preset and run."""
    chapter = get_kind(kind).chapter
    if run.endswith(BILINGUAL_SUFFIX):        # the bilingual run is built by chapter 09
        run, chapter = run[:-len(BILINGUAL_SUFFIX)], "09"
    cmd = ["python", "-m", "mlclt_utils.runner", "--preset", preset.get("name", "?")]
    if run != preset.get("name"):
        cmd += ["--run", run]
    cmd += ["--chapters", chapter]
    for k, v in (preset.get("overrides") or {}).items():
        cmd += ["--param", f"{k}={json.dumps(v)}"]
    return " ".join(shlex.quote(c) for c in cmd)


def require_current(kind: str, preset, run: str | None = None, key: str | None = None,
                    root=None) -> Stage:
    """The stage, after checking that it and every stage above it are complete and were
    built from the config this preset asks for; else :class:`StaleStage`."""
    preset = _preset(preset)
    run = run or preset["name"]
    k = get_kind(kind)
    _check_key(k, preset, key)
    ups = []
    for up_kind, up_key in k.upstream(preset, key):
        ups.append(require_current(up_kind, preset, run, up_key, root))
    st = stage(kind, run, key, root)
    how = f"rebuild it with: {rebuild_command(kind, preset, run)}"
    if not st.is_complete():
        state = ("a build of it is running or was interrupted" if st.file(IN_PROGRESS_FILE).exists()
                 else "it has not been built")
        raise StaleStage(f"stage {st.name!r} of run {run!r} is not complete ({state}); {how}")
    manifest = st.manifest()
    expected = k.config(preset, key)
    if manifest["config_hash"] != config_hash(expected):
        diff = "; ".join(config_diff(manifest["config"], expected))
        raise StaleStage(f"stage {st.name!r} of run {run!r} was built under another "
                         f"configuration ({diff}); {how}")
    inputs = {u.name: u.identity() for u in ups}
    if manifest.get("inputs") != inputs:
        changed = sorted(n for n in set(inputs) | set(manifest.get("inputs", {}))
                         if inputs.get(n) != manifest.get("inputs", {}).get(n))
        raise StaleStage(f"stage {st.name!r} of run {run!r} was built from other versions of "
                         f"{changed}, which were rebuilt since; {how}")
    return st


def build(kind: str, preset, run: str | None = None, key: str | None = None, root=None,
          device: str | None = None, progress: bool = True, **options) -> Stage:
    """Build stage ``kind``/``key`` of ``run`` for ``preset`` unless it is current.

    Upstream stages must be current (:class:`StaleStage` otherwise, naming the command that
    rebuilds them). ``options`` go to the kind's build (e.g. ``max_steps_this_call``)."""
    preset = _preset(preset)
    run = run or preset["name"]
    k = get_kind(kind)
    _check_key(k, preset, key)
    config = k.config(preset, key)           # raises on a bad value before any work
    ups = [require_current(uk, preset, run, ukey, root) for uk, ukey in k.upstream(preset, key)]
    st = stage(kind, run, key, root)
    claim = {"config_hash": config_hash(config), "inputs": {u.name: u.identity() for u in ups}}
    info = distributed.init_distributed(device) if k.distributed else distributed.DistInfo()
    current = st.is_complete() and _claim_of(st.manifest()) == claim
    marker = st.file(IN_PROGRESS_FILE)
    if not distributed.all_agree(not current):
        if info.is_main:
            marker.unlink(missing_ok=True)   # left by a build killed after its manifest
        return st

    if info.is_main:
        same = k.resumable and marker.exists() and _read_marker(marker) == claim
        st.start(clean=not same)     # a resumable build of the same config keeps its state
        write_json(marker, {**claim, "config": config})
    distributed.barrier()

    ctx = BuildContext(preset=preset, run=run, key=key, root=root, stage=st, config=config,
                       device=device, progress=progress, options=options, is_main=info.is_main)
    t0 = time.time()
    extra = k.build(ctx)
    if isinstance(extra, Incomplete):
        return st
    if info.is_main:
        st.file(RESUME_FILE).unlink(missing_ok=True)
        st.finish(config, inputs=ups, timings={"build_seconds": time.time() - t0},
                  volatile=k.volatile, **(extra or {}))
        marker.unlink()
    distributed.barrier()
    return st


def _claim_of(record: Mapping) -> dict:
    """What a manifest or an in-progress marker says a stage was built from."""
    return {"config_hash": record.get("config_hash"), "inputs": record.get("inputs")}


def _read_marker(marker) -> dict | None:
    try:
        return _claim_of(read_json(marker))
    except ValueError:
        return None


def load(kind: str, preset, run: str | None = None, key: str | None = None, root=None, **kwargs):
    """What stage ``kind``/``key`` holds, after checking it is current for ``preset``."""
    preset = _preset(preset)
    st = require_current(kind, preset, run, key, root)
    return get_kind(kind).load(st, **kwargs)


def load_built(kind: str, run: str, key: str | None = None, root=None, **kwargs):
    """What a complete stage holds, as built (its inputs must be intact), without a preset:
    for users who open a run's artifacts directly."""
    st = stage(kind, run, key, root)
    st.require()
    return get_kind(kind).load(st, **kwargs)


def chain(preset) -> list[tuple[str, str | None]]:
    """Every (kind, key) of the chain for this preset, in build order."""
    preset = _preset(preset)
    names = model_names(preset)
    out = [("corpus", None), ("tokenizer", None)]
    out += [("data", mixture_name(p)) for p in preset["mixtures"]["english_shares"]]
    out += [("models", n) for n in names]
    out += [("clt", n) for n in names] + [("clt_eval", n) for n in names]
    out += [("unit_stats", n) for n in names]
    out += [("language_stats", n) for n in names]
    ref = reference_model(preset)
    out += [("graphs", ref), ("interventions", ref)]
    base = diffing_base(preset)
    out += [("finetunes", v) for v in ("weak", "mixture", "strong")]
    out += [("diff_clts", v) for v in ("stagewise", "floor", "data_only", "mixture", "strong")]
    out += [("crosscoders", base), ("diffing", base)]
    out += [("neurons", n) for n in size_models(preset)]
    return out


def bilingual_chain(preset) -> list[tuple[str, str | None]]:
    """Every (kind, key) of chapter 09's bilingual run (``<run>-bilingual``), in build order."""
    bi = bilingual_preset(_preset(preset))
    names = size_models(bi)
    out = [("corpus", None), ("tokenizer", None), ("data", mixture_name(bi["mixtures"]["english_shares"][0]))]
    out += [("models", n) for n in names] + [("saes", n) for n in names]
    return out + [("stitching", names[0])]


def run_preset(preset, run: str) -> dict:
    """The preset a run's stages are built with: the bilingual one for ``<run>-bilingual``."""
    preset = _preset(preset)
    return bilingual_preset(preset) if run.endswith(BILINGUAL_SUFFIX) else preset


# ================================================================== the chain's kinds =====

def _write_text_json(path, obj) -> None:
    """Compact UTF-8 JSON (texts stay readable and about half the size of escaped JSON)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


# ---------------------------------------------------------------------------- corpus -----

def _corpus_config(preset, key=None) -> dict:
    return {**preset["corpus"], "seed": preset["seed"]}


def _build_corpus(ctx: BuildContext):
    from .data.corpus import check_corpus_config, load_corpus

    check_corpus_config(ctx.config)
    corpus = load_corpus(ctx.config, ctx.config["seed"])
    _write_text_json(ctx.stage.file("texts.json"), corpus.texts)
    _write_text_json(ctx.stage.file("ids.json"), corpus.ids)
    _write_text_json(ctx.stage.file("parallel.json"), corpus.parallel)
    with atomic_path(ctx.stage.file("summary.csv")) as tmp:
        corpus.summary().to_csv(tmp)
    return {"source": corpus.source}


def _load_corpus(st: Stage):
    from .data.corpus import Corpus

    manifest = st.manifest()
    return Corpus(languages=list(manifest["config"]["languages"]),
                  texts=read_json(st.file("texts.json")),
                  parallel=read_json(st.file("parallel.json")),
                  source=manifest.get("source", manifest["config"].get("source", "")),
                  ids=read_json(st.file("ids.json")))


register(StageKind("corpus", "01", _corpus_config, lambda p, k: [], _build_corpus, _load_corpus))


# ------------------------------------------------------------------------- tokenizer -----

def _tokenizer_config(preset, key=None) -> dict:
    from .sources import loads_models, model_source

    if loads_models(preset):      # loaded models: the reference model's own tokenizer
        return {"source": model_source(preset, reference_model(preset)),
                "model_max_length": preset["models"]["n_ctx"]}
    return {**preset["tokenizer"], "seed": preset["seed"],
            "model_max_length": preset["models"]["n_ctx"]}


def _build_tokenizer(ctx: BuildContext):
    from .sources import import_tokenizer
    from .tokenizer import fertility_table, save_tokenizer, train_tokenizer

    corpus = ctx.input("corpus")
    if "source" in ctx.config:
        tok = import_tokenizer(ctx.config["source"], ctx.config["model_max_length"])
    else:
        tok = train_tokenizer(corpus, ctx.config, ctx.config["seed"], ctx.config["model_max_length"])
    save_tokenizer(tok, ctx.stage.path)
    if corpus.has_parallel:
        texts = {lang: corpus.parallel[lang] for lang in corpus.languages}
    else:
        texts = {lang: corpus.texts[lang]["test"] for lang in corpus.languages}
    with atomic_path(ctx.stage.file("fertility.csv")) as tmp:
        fertility_table(tok, texts).to_csv(tmp)
    return {"vocab_size": len(tok)}


def _load_tokenizer(st: Stage):
    from .tokenizer import load_tokenizer

    return load_tokenizer(st.path)


register(StageKind("tokenizer", "01", _tokenizer_config, lambda p, k: [("corpus", None)],
                   _build_tokenizer, _load_tokenizer))


# ------------------------------------------------------------------------------ data -----

def _data_config(preset, key) -> dict:
    from .data.datasets import mixture_budgets

    share = mixture_share(preset, key)
    cfg = {"english_share": share, "languages": list(preset["corpus"]["languages"]),
           "total_tokens": preset["training"]["tokens"], "n_ctx": preset["models"]["n_ctx"],
           "weights": preset["mixtures"]["weights"],
           "eval_tokens_per_language": preset["training"]["eval_tokens_per_language"],
           "seed": preset["seed"]}
    mixture_budgets(cfg["languages"], share, cfg["total_tokens"], cfg["weights"])  # checks
    return cfg


def _build_data(ctx: BuildContext):
    import torch

    from .artifacts import save_tensors
    from .data.datasets import build_eval_dataset, build_mixture_dataset

    cfg = ctx.config
    corpus, tokenizer = ctx.input("corpus"), ctx.input("tokenizer")
    train, report = build_mixture_dataset(corpus, tokenizer, cfg["english_share"],
                                          cfg["total_tokens"], cfg["n_ctx"], cfg["seed"],
                                          cfg["weights"])
    meta = {"languages": ",".join(corpus.languages)}
    save_tensors(ctx.stage.file("train.safetensors"),
                 {"tokens": train["tokens"].to(torch.int32), "language": train["language"]}, meta)
    for split in ("validation", "test"):
        tensors = build_eval_dataset(corpus, tokenizer, split, cfg["n_ctx"],
                                     cfg["eval_tokens_per_language"])
        save_tensors(ctx.stage.file(f"{split}.safetensors"), tensors, meta)
    write_json(ctx.stage.file("report.json"), {"languages": corpus.languages,
                                               "english_share": cfg["english_share"],
                                               "per_language": report})


def _load_data(st: Stage) -> dict:
    """``{"train": {"tokens": LongTensor [N, n_ctx], "language": LongTensor [N]},
    "validation": {lang: LongTensor}, "test": {lang: LongTensor}, "languages": [...],
    "report": {...}}``."""
    from .artifacts import load_tensors

    train = load_tensors(st.file("train.safetensors"))
    train["tokens"] = train["tokens"].long()
    report = read_json(st.file("report.json"))
    return {"train": train,
            "validation": {k: v.long() for k, v in load_tensors(st.file("validation.safetensors")).items()},
            "test": {k: v.long() for k, v in load_tensors(st.file("test.safetensors")).items()},
            "languages": report["languages"], "report": report["per_language"]}


register(StageKind("data", "01", _data_config, lambda p, k: [("corpus", None), ("tokenizer", None)],
                   _build_data, _load_data,
                   keys=lambda p: [mixture_name(s) for s in p["mixtures"]["english_shares"]]))


# ---------------------------------------------------------------------------- models -----

def model_mixture(name: str) -> str:
    """The mixture a model is trained on: 's-en50' -> 'en50'."""
    from .models.config import parse_model_name

    return mixture_name(parse_model_name(name)[1])


def _model_config(preset, key) -> dict:
    from .models.config import DEFAULT_ACT_FN, parse_model_name
    from .sources import model_source

    size_name, share = parse_model_name(key)
    source = model_source(preset, key)
    if source is not None:        # loaded, not trained (mlclt_utils.sources)
        return {"model_name": key, "source": source, "n_ctx": preset["models"]["n_ctx"],
                "english_share": share, "languages": list(preset["corpus"]["languages"])}
    return {"model_name": key, "size_name": size_name,
            "size": dict(preset["models"]["sizes"][size_name]),
            "n_ctx": preset["models"]["n_ctx"], "d_vocab": preset["tokenizer"]["vocab_size"],
            "act_fn": DEFAULT_ACT_FN, "training": dict(preset["training"]),
            "seed": preset["seed"], "english_share": share,
            "languages": list(preset["corpus"]["languages"])}


# a loaded model's weights are kept as its one checkpoint, at this step: the released
# checkpoints carry no training step, and chapters that follow checkpoints then show one point.
# Its one metrics row holds the validation loss per language on the run's own validation text.
LOADED_STEP = 1


def _import_model(ctx: BuildContext):
    from .artifacts import save_tensors
    from .models.config import config_to_dict
    from .models.train import checkpoint_name, eval_loss_per_language
    from .sources import import_model

    cfg = ctx.config
    model, info = import_model(cfg["source"], ctx.key, cfg["n_ctx"], ctx.input("tokenizer"))
    state = model.state_dict()
    save_tensors(ctx.stage.file(checkpoint_name(LOADED_STEP)), state, {"step": str(LOADED_STEP)})
    save_tensors(ctx.stage.file("model.safetensors"), state)
    val = ctx.input("data", model_mixture(ctx.key))["validation"]
    row = {"step": LOADED_STEP, "tokens": None, "train_loss": None, "lr": None,
           "val_loss": eval_loss_per_language(model, val)}
    with atomic_path(ctx.stage.file(METRICS_FILE)) as tmp:
        tmp.write_text(json.dumps(row) + "\n")
    write_json(ctx.stage.file("config.json"), {
        "hooked_transformer": config_to_dict(model.cfg), "languages": cfg["languages"],
        "checkpoint_steps": [LOADED_STEP], "model_name": ctx.key,
        "english_share": cfg["english_share"], "loaded_from": info})
    return {"loaded_from": info}


def _build_model(ctx: BuildContext):
    from .models.config import model_config
    from .models.train import train_model

    cfg = ctx.config
    if "source" in cfg:
        return _import_model(ctx)
    data = ctx.input("data", model_mixture(ctx.key))
    tokenizer = ctx.input("tokenizer")
    if len(tokenizer) > cfg["d_vocab"]:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than "
                         f"tokenizer.vocab_size {cfg['d_vocab']} of the preset")
    model_cfg = model_config(cfg["size"], cfg["n_ctx"], cfg["d_vocab"], seed=cfg["seed"],
                             act_fn=cfg["act_fn"], name=ctx.key)
    summary = train_model(ctx.stage, model_cfg, data["train"], data["validation"],
                          cfg["training"], seed=cfg["seed"], device=ctx.device,
                          languages=cfg["languages"], progress=ctx.progress,
                          stop_after_step=ctx.options.get("stop_after_step"),
                          info={"model_name": ctx.key, "size_name": cfg["size_name"],
                                "size": cfg["size"], "english_share": cfg["english_share"]})
    if not summary.get("completed", True):
        return INCOMPLETE
    return {"summary": {k: v for k, v in summary.items() if k != "completed"}}


def _load_model(st: Stage, step: int | None = None, device: str = "cpu"):
    from .models.load import load_model_from

    tok = stage("tokenizer", st.run, None, st.root)
    return load_model_from(st.path, tok.path if tok.is_complete() else None, step, device)


register(StageKind("models", "02", _model_config,
                   lambda p, k: [("data", model_mixture(k)), ("tokenizer", None)],
                   _build_model, _load_model, keys=model_names, resumable=True, distributed=True))


def _retrieval_config(preset, key) -> dict:
    f = preset["features"]
    return {"model_name": key, "parallel": f["parallel"], "max_rows": f["retrieval_rows"],
            "batch_size": f["batch_size"], "languages": trained_languages(preset, key),
            "bootstrap": f["bootstrap"], "seed": preset["seed"], "ks": [1, 5]}


def _build_retrieval(ctx: BuildContext):
    """Translation retrieval on the residual stream at every kept checkpoint: one streamed
    pass per checkpoint and language over the parallel verses (``features.retrieval``)."""
    import pandas as pd

    from .data.datasets import verse_rows
    from .features.activations import ResidualStream, collect_unit_stats
    from .features.parallel import load_parallel
    from .features.retrieval import retrieval_by_layer
    from .models.load import checkpoint_steps
    from .viz.progress import progress_bar

    cfg = ctx.config
    parallel = load_parallel(cfg["parallel"], cfg["languages"], corpus=ctx.input("corpus"))
    if cfg["max_rows"]:
        parallel = parallel.subset(cfg["max_rows"])
    steps = checkpoint_steps(stage("models", ctx.run, ctx.key, ctx.root).path)
    parts = []
    for step in progress_bar(iterable=steps, desc=f"retrieval {ctx.key}", disable=not ctx.progress):
        model = ctx.input("models", ctx.key, step=step)
        source = ResidualStream(model)
        stats = {lang: collect_unit_stats(source, verse_rows(model.tokenizer, parallel.texts[lang], model.cfg.n_ctx),
                                          cfg["batch_size"]) for lang in parallel.languages}
        parts.append(retrieval_by_layer(stats, None, cfg["ks"], cfg["bootstrap"], cfg["seed"]).assign(step=step))
    _write_tables(ctx.stage, {"retrieval": pd.concat(parts, ignore_index=True)})


register(StageKind("retrieval", "02", _retrieval_config,
                   lambda p, k: [("corpus", None), ("tokenizer", None), ("models", k)],
                   _build_retrieval, lambda st: _load_tables(st, ("retrieval",))["retrieval"],
                   keys=model_names))


# a run's models, read from the artifact store (models.load reads one folder)

def load_model(run: str, model_name: str, step: int | None = None, root=None, device: str = "cpu"):
    """The trained model ``model_name`` of ``run`` (``step=None``) or its checkpoint at
    ``step``, in eval mode, with the run's tokenizer attached. To check it against a preset
    first, use ``stages.load("models", preset, run, model_name)``."""
    return load_built("models", run, model_name, root, step=step, device=device)


def list_checkpoints(run: str, model_name: str, root=None) -> list[int]:
    """Steps with saved weights, ascending (the last is the final step)."""
    from .models.load import checkpoint_steps

    st = stage("models", run, model_name, root)
    st.require()
    return checkpoint_steps(st.path)


def read_metrics(run: str, model_name: str, root=None):
    """Training metrics as a DataFrame: step, tokens, train_loss, lr, val_loss_<lang>..."""
    import pandas as pd

    path = stage("models", run, model_name, root).file(METRICS_FILE)
    if not path.exists():
        raise ManifestMismatch(f"model {model_name!r} of run {run!r} has no metrics yet; "
                               "train it first")
    rows = []
    for r in read_jsonl(path):
        flat = {k: v for k, v in r.items() if k != "val_loss"}
        flat.update({f"val_loss_{lang}": v for lang, v in r.get("val_loss", {}).items()})
        rows.append(flat)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------ CLTs -----

def clt_kind(cross_layer: bool = True, activation: str = "jumprelu") -> str:
    """``clt`` for the JumpReLU CLT, ``plt`` for per-layer transcoders, with the activation
    appended for the other modes (``clt-topk``)."""
    name = "clt" if cross_layer else "plt"
    return name if activation == "jumprelu" else f"{name}-{activation}"


def _loaded_clt(preset, key, cross_layer: bool, activation: str) -> dict | None:
    """Where the transcoder of this kind is loaded from, or None when chapter 03 trains it:
    only the CLT itself can be loaded; the comparison transcoders always train."""
    from .sources import clt_source

    return clt_source(preset, key) if (cross_layer, activation) == (True, "jumprelu") else None


def _clt_config(cross_layer: bool, activation: str):
    def config(preset, key) -> dict:
        source = _loaded_clt(preset, key, cross_layer, activation)
        if source is not None:
            return {"model_name": key, "source": source}       # loaded, not trained
        clt = {**preset["clt"], "cross_layer": cross_layer, "activation": activation}
        return {"model_name": key, "clt": clt, "seed": preset["seed"]}
    return config


def _build_clt(ctx: BuildContext):
    import torch

    from .clt.activations import ActivationBuffer
    from .clt.formats import save_clt
    from .clt.model import CLTConfig, CrossLayerTranscoder
    from .clt.train import train_clt
    from .device import default_device

    info = distributed.current()
    device = ctx.device or default_device(info.local_rank)
    if "source" in ctx.config:
        return _import_clt(ctx, device)
    cfg, seed = ctx.config["clt"], int(ctx.config["seed"])
    tokens = ctx.input("data", model_mixture(ctx.key))["train"]["tokens"]
    model = ctx.input("models", ctx.key, device=device)
    source = ActivationBuffer(model, tokens, cfg["batch_tokens"], cfg["buffer_tokens"], seed=seed,
                              cache_dir=ctx.options.get("cache_dir"), write_cache=info.is_main,
                              context_length=cfg["context_length"])
    clt_cfg = CLTConfig(n_layers=model.cfg.n_layers, d_model=model.cfg.d_model,
                        d_features=cfg["features_per_layer"], activation=cfg["activation"],
                        cross_layer=cfg["cross_layer"], k=cfg["k"],
                        threshold_init=cfg["threshold_init"], bandwidth=cfg["bandwidth"])
    clt = CrossLayerTranscoder(clt_cfg, generator=torch.Generator().manual_seed(seed))
    summary = train_clt(clt, source, cfg["train_tokens"], cfg, stage=ctx.stage, seed=seed,
                        device=device, progress=ctx.progress,
                        max_steps_this_call=ctx.options.get("max_steps_this_call"))
    if not summary["completed"]:
        return INCOMPLETE
    if ctx.is_main:
        save_clt(clt.to("cpu"), ctx.stage.path)
    return {"summary": {k: v for k, v in summary.items() if k != "completed"}}


def _import_clt(ctx: BuildContext, device: str):
    from .clt.formats import save_clt
    from .sources import import_clt

    model = ctx.input("models", ctx.key, device=device)
    clt, info = import_clt(ctx.config["source"], model, device=device,
                           progress=print if ctx.progress else (lambda *a: None))
    if ctx.is_main:
        save_clt(clt.to("cpu"), ctx.stage.path)
    return {"loaded_from": info}


def _clt_upstream(cross_layer: bool, activation: str):
    def upstream(preset, key) -> list:
        if _loaded_clt(preset, key, cross_layer, activation) is not None:
            return [("models", key)]          # a loaded CLT reads no training text
        return [("models", key), ("data", model_mixture(key))]
    return upstream


def _load_clt(st: Stage, device: str = "cpu"):
    from .clt.formats import load_clt

    return load_clt(st.path, device=device)


def trained_languages(preset, model_name: str) -> list[str]:
    """The languages with a non-zero budget in the model's mixture (e.g. no English for an
    en0 model): pooled figures and targets use these only."""
    from .data.datasets import mixture_budgets

    cfg = _data_config(preset, model_mixture(model_name))
    budgets = mixture_budgets(cfg["languages"], cfg["english_share"], cfg["total_tokens"],
                              cfg["weights"])
    return [lang for lang in cfg["languages"] if budgets[lang] > 0]


def _eval_config(train_kind: str):
    def config(preset, key) -> dict:
        return {"model_name": key, "kind": train_kind, "split": "validation",
                "max_tokens_per_language": preset["clt"]["eval_tokens"], "batch_size": 16,
                "pooled_languages": trained_languages(preset, key)}
    return config


def _build_clt_eval(ctx: BuildContext):
    from .clt.evaluate import evaluate_clt

    cfg = ctx.config
    data = ctx.input("data", model_mixture(ctx.key))
    tables = evaluate_clt(ctx.input("models", ctx.key), ctx.input(cfg["kind"], ctx.key),
                          data[cfg["split"]], cfg["max_tokens_per_language"], cfg["batch_size"],
                          pooled_languages=cfg["pooled_languages"])
    for name, df in tables.items():
        with atomic_path(ctx.stage.file(f"metrics_{name}.csv")) as tmp:
            df.to_csv(tmp, index=False)


def _load_clt_eval(st: Stage) -> dict:
    import pandas as pd

    return {name: pd.read_csv(st.file(f"metrics_{name}.csv")) for name in ("layers", "languages")}


def _register_clt_kinds() -> None:
    from .clt.model import ACTIVATIONS

    for cross in (True, False):
        for activation in ACTIVATIONS:
            name = clt_kind(cross, activation)
            register(StageKind(
                name, "03", _clt_config(cross, activation),
                _clt_upstream(cross, activation),
                _build_clt, _load_clt, keys=model_names, resumable=True, distributed=True))
            register(StageKind(
                f"{name}_eval", "03", _eval_config(name),
                lambda p, k, name=name: [(name, k), ("models", k), ("data", model_mixture(k))],
                _build_clt_eval, _load_clt_eval, keys=model_names))


_register_clt_kinds()


# ------------------------------------------------------------------ unit statistics -----

UNIT_KINDS = ("clt", "resid")


def _unit_stats_config(preset, key) -> dict:
    f = preset["features"]
    return {"model_name": key, "parallel": f["parallel"], "max_rows": f["max_rows"],
            "batch_size": f["batch_size"], "languages": list(preset["corpus"]["languages"]),
            "units": list(UNIT_KINDS)}


def _build_unit_stats(ctx: BuildContext):
    """Per language of the parallel set: firing sets, counts and mean activations of the
    CLT's features and of the residual stream, one streamed pass per language."""
    from .artifacts import save_tensors
    from .data.datasets import verse_rows
    from .features.activations import CLTFeatures, ResidualStream, collect_unit_stats
    from .features.parallel import load_parallel

    cfg = ctx.config
    parallel = load_parallel(cfg["parallel"], cfg["languages"], corpus=ctx.input("corpus"))
    if cfg["max_rows"]:
        parallel = parallel.subset(cfg["max_rows"])
    model, clt = ctx.input("models", ctx.key), ctx.input("clt", ctx.key)
    sources = {"clt": CLTFeatures(model, clt), "resid": ResidualStream(model)}
    tensors = {}
    for lang in parallel.languages:
        rows = verse_rows(model.tokenizer, parallel.texts[lang], model.cfg.n_ctx)
        for kind, source in sources.items():
            stats = collect_unit_stats(source, rows, cfg["batch_size"])
            tensors.update(stats.to_tensors(f"{kind}.{lang}."))
    save_tensors(ctx.stage.file("unit_stats.safetensors"), tensors)
    write_json(ctx.stage.file("rows.json"), {"languages": parallel.languages, "keys": parallel.keys,
                                             "dropped": parallel.dropped, "source": parallel.source})


def _load_unit_stats(st: Stage) -> dict:
    """``{"clt": {lang: UnitStats}, "resid": {lang: UnitStats}, "keys": [...], "dropped": n}``."""
    from .artifacts import load_tensors
    from .features.activations import UnitStats

    rows = read_json(st.file("rows.json"))
    tensors = load_tensors(st.file("unit_stats.safetensors"))
    out = {kind: {lang: UnitStats.from_tensors(tensors, f"{kind}.{lang}.")
                  for lang in rows["languages"]} for kind in UNIT_KINDS}
    return {**out, "keys": rows["keys"], "dropped": rows["dropped"], "source": rows["source"]}


register(StageKind("unit_stats", "04", _unit_stats_config,
                   lambda p, k: [("corpus", None), ("tokenizer", None), ("models", k), ("clt", k)],
                   _build_unit_stats, _load_unit_stats, keys=model_names))


def _write_tables(st: Stage, tables: Mapping[str, Any]) -> None:
    """Each DataFrame of ``tables`` as ``<name>.csv`` in the stage folder, written atomically."""
    for name, df in tables.items():
        with atomic_path(st.file(f"{name}.csv")) as tmp:
            df.to_csv(tmp, index=False)


def _load_tables(st: Stage, names) -> dict:
    """The stage's ``<name>.csv`` tables (empty cells read as missing, "None"/"NA" text kept)."""
    import pandas as pd

    return {name: pd.read_csv(st.file(f"{name}.csv"), keep_default_na=False, na_values=[""])
            for name in names}


# ------------------------------------------------------------- language statistics -----

def _language_stats_config(preset, key) -> dict:
    f = preset["features"]
    return {"model_name": key, "languages": list(preset["corpus"]["languages"]),
            "fit_split": "validation", "score_split": "test",
            "probe_tokens": f["probe_tokens"], "probe_max_iter": f["probe_max_iter"],
            "top_tokens": f["top_tokens"], "batch_size": f["batch_size"],
            "min_frequency": f["min_frequency"], "min_concentration": f["min_concentration"],
            "seed": preset["seed"], "trained_languages": trained_languages(preset, key)}


def _build_language_stats(ctx: BuildContext):
    """Chapter 05: language probes by layer (residual stream and CLT features), the
    token-language table of the model's training data, its CLT's language features per layer
    with their logit lift and top tokens, and a per-token table linking the first layer's
    probe to the late-layer language features."""
    from .features.language_stats import language_statistics

    stats = language_statistics(ctx.input("models", ctx.key), ctx.input("clt", ctx.key),
                                ctx.input("data", model_mixture(ctx.key)),
                                ctx.input("unit_stats", ctx.key), ctx.input("tokenizer"),
                                ctx.config)
    _write_tables(ctx.stage, stats["tables"])
    _write_text_json(ctx.stage.file("token_languages.json"), stats["token_languages"].to_dict())
    write_json(ctx.stage.file("info.json"), stats["info"])


def _load_language_stats(st: Stage) -> dict:
    """``{"probe", "language_features", "feature_counts", "tokens": DataFrames,
    "token_languages": TokenLanguages, "languages", "late_layers", "lift_languages", ...}``."""
    from .features.language import TokenLanguages

    out = _load_tables(st, ("probe", "language_features", "feature_counts", "tokens", "lift_null"))
    out["token_languages"] = TokenLanguages.from_dict(read_json(st.file("token_languages.json")))
    return {**out, **read_json(st.file("info.json"))}


register(StageKind("language_stats", "05", _language_stats_config,
                   lambda p, k: [("tokenizer", None), ("data", model_mixture(k)), ("models", k),
                                 ("clt", k), ("unit_stats", k)],
                   _build_language_stats, _load_language_stats, keys=model_names))


# ------------------------------------------------------------- attribution graphs -----

def _graphs_config(preset, key) -> dict:
    # "prompts": how prompts are chosen (one verse per concept in every language)
    return {"model_name": key, "languages": list(preset["corpus"]["languages"]), "prompts": "same_verse",
            **preset["graphs"]}


def _build_graphs(ctx: BuildContext):
    """Chapter 06: the mined concept table, cloze prompts, and for each prompt the pruned
    attribution graphs of the answer's logit and of its language vector."""
    from .graphs.concepts import concept_graphs

    out = concept_graphs(ctx.input("models", ctx.key), ctx.input("clt", ctx.key), ctx.input("corpus"),
                         ctx.config, progress=ctx.progress, viewer_dir=ctx.stage.file("viewer"),
                         tokenizer_dir=stage("tokenizer", ctx.run, None, ctx.root).path,
                         scan=f"{ctx.run}-{ctx.key}")
    _write_tables(ctx.stage, out)


GRAPH_TABLES = ("concepts", "prompts", "scores", "nodes", "edges")


register(StageKind("graphs", "06", _graphs_config,
                   lambda p, k: [("corpus", None), ("tokenizer", None), ("models", k), ("clt", k)],
                   _build_graphs, lambda st: _load_tables(st, GRAPH_TABLES),
                   keys=lambda p: [reference_model(p)]))


# ------------------------------------------------------------------ interventions -----

def _interventions_config(preset, key) -> dict:
    return {"model_name": key, "languages": list(preset["corpus"]["languages"]),
            "seed": preset["seed"], "selection_rows": preset["features"]["max_rows"],
            **preset["interventions"]}


def _build_interventions(ctx: BuildContext):
    """Chapter 07: steer each prompt's language features towards every other language and
    classify the continuation; the span classifier's accuracy on the same span length."""
    from .interventions import switch_experiment

    tables = switch_experiment(ctx.input("models", ctx.key), ctx.input("clt", ctx.key),
                               ctx.input("unit_stats", ctx.key), ctx.input("language_stats", ctx.key),
                               ctx.input("graphs", ctx.key), ctx.input("corpus"), ctx.config,
                               ctx.preset["features"], progress=ctx.progress)
    tables["results"]["continuation"] = [" ".join(map(str, c)) for c in tables["results"]["continuation"]]
    tables["prompts"]["ids"] = [" ".join(map(str, i)) for i in tables["prompts"]["ids"]]
    _write_tables(ctx.stage, tables)


def _load_interventions(st: Stage) -> dict:
    out = _load_tables(st, ("results", "classifier", "features", "prompts"))
    out["results"]["continuation"] = [[int(t) for t in str(c).split()] if isinstance(c, str) else []
                                      for c in out["results"]["continuation"]]
    out["prompts"]["ids"] = [[int(t) for t in str(c).split()] for c in out["prompts"]["ids"]]
    return out


register(StageKind("interventions", "07", _interventions_config,
                   lambda p, k: [("corpus", None), ("models", k), ("clt", k), ("unit_stats", k),
                                 ("language_stats", k), ("graphs", k)],
                   _build_interventions, _load_interventions,
                   keys=lambda p: [reference_model(p)]))


# ------------------------------------------------------------------------ neurons -----

def _neurons_config(preset, key) -> dict:
    f = preset["features"]
    return {"model_name": key, "languages": list(preset["corpus"]["languages"]),
            "parallel": f["parallel"], "batch_size": f["batch_size"], "seed": preset["seed"],
            "ablation_split": "validation", "row_scores": "every layer", **preset["neurons"]}


def _build_neurons(ctx: BuildContext):
    """Chapter 10: LRDS / SADS and key neurons at every checkpoint; LAPE, ablations and the
    CLT-feature comparison at the final one."""
    import torch

    from .artifacts import save_tensors
    from .data.datasets import verse_rows
    from .features.parallel import load_parallel
    from .models.load import checkpoint_steps
    from .neurons import lingua_franca

    cfg = ctx.config
    parallel = load_parallel(cfg["parallel"], cfg["languages"], corpus=ctx.input("corpus"))
    parallel = parallel.subset(cfg["max_rows"])
    tokenizer = ctx.input("tokenizer")
    n_ctx = ctx.preset["models"]["n_ctx"]
    rows = {lang: verse_rows(tokenizer, parallel.texts[lang], n_ctx) for lang in parallel.languages}
    per_lang = max(1, cfg["ablation_tokens"] // n_ctx)
    # the parallel rows that choose the key neurons come from the test books: the ablation is
    # scored on the validation books, so neurons are never chosen and scored on the same text
    held_out = ctx.input("data", model_mixture(ctx.key))[cfg["ablation_split"]]
    eval_sets = {lang: held_out[lang][:per_lang] for lang in parallel.languages if lang in held_out}
    steps = checkpoint_steps(stage("models", ctx.run, ctx.key, ctx.root).path)
    units = ctx.input("unit_stats", ctx.key)
    clt_stats = {lang: units["clt"][lang] for lang in parallel.languages}
    out = lingua_franca(lambda step: ctx.input("models", ctx.key, step=step), steps, rows, eval_sets,
                        cfg, clt_stats=clt_stats, progress=ctx.progress)
    _write_tables(ctx.stage, out["tables"])
    save_tensors(ctx.stage.file("similarity.safetensors"),
                 {k: torch.from_numpy(v) for k, v in out["similarity"].items()})
    write_json(ctx.stage.file("rows.json"), {"languages": parallel.languages, "steps": steps,
                                             "rows": len(parallel), "source": parallel.source,
                                             "eval_rows": {k: len(v) for k, v in eval_sets.items()}})


NEURON_TABLES = ("scores", "key_counts", "key_units", "key_location", "lape_units", "method_overlap",
                 "ablation", "row_scores")


def _load_neurons(st: Stage) -> dict:
    """``{table name: DataFrame, "similarity": {"mlp"|"clt": array}, "languages", "steps", ...}``."""
    from .artifacts import load_tensors

    out = _load_tables(st, NEURON_TABLES)
    out["scores"]["layer"] = out["scores"]["layer"].astype(str)
    out["similarity"] = {k: v.numpy() for k, v in load_tensors(st.file("similarity.safetensors")).items()}
    return {**out, **read_json(st.file("rows.json"))}


register(StageKind("neurons", "10", _neurons_config,
                   lambda p, k: [("corpus", None), ("tokenizer", None), ("data", model_mixture(k)),
                                 ("models", k), ("unit_stats", k)],
                   _build_neurons, _load_neurons, keys=size_models))


# ---------------------------------------------------------- bilingual SAEs (chapter 09) -----
# These kinds live in the bilingual run ("<run>-bilingual", presets.bilingual_preset), whose
# corpus, tokenizer, data and models are built by the kinds above.

SAE_KEYS = ("sae_checkpoints", "sae_expansion", "sae_k", "sae_tokens", "sae_batch_tokens", "sae_lr",
            "sae_dead_window_tokens", "sae_normalize", "sae_seeds", "context_rows", "top_contexts", "context_ratio", "language_share")


def _saes_config(preset, key) -> dict:
    """The SAE settings of one model. ``sae_k`` is set for the main size and scaled with
    d_model for the others, so every size's SAEs have the same share of active latents (the
    latents are ``sae_expansion`` x d_model): a larger model then has more bilingual latents
    only if it has more, not because its SAEs are sparser."""
    bi = preset["bilingual"]
    out = {"model_name": key, "languages": list(preset["corpus"]["languages"]),
           "seed": preset["seed"], **{k: bi[k] for k in SAE_KEYS}}
    sizes = preset["models"]["sizes"]
    d_main = sizes[preset["models"]["main_size"]]["d_model"]
    d_here = sizes[key.split("-")[0]]["d_model"]
    out["sae_k"] = max(1, round(bi["sae_k"] * d_here / d_main))
    return out


def _stitching_config(preset, key) -> dict:
    bi = preset["bilingual"]
    return {"model_name": key, "languages": list(preset["corpus"]["languages"]), "seed": preset["seed"],
            "stitch_batches": bi["stitch_batches"], "stitch_rows": bi["stitch_rows"],
            "control_draws": bi["control_draws"]}


def _build_saes(ctx: BuildContext):
    """SAEs at the last kept checkpoints, their quality and every latent's language."""
    from .features.language import TokenLanguages
    from .models.load import checkpoint_steps
    from .sae.dynamics import bilingual_dynamics

    cfg = ctx.config
    data = ctx.input("data", model_mixture(ctx.key))
    token_languages = TokenLanguages.from_training_data(data, ctx.preset["tokenizer"]["vocab_size"])
    steps = checkpoint_steps(stage("models", ctx.run, ctx.key, ctx.root).path)
    if cfg["sae_checkpoints"]:
        steps = steps[-int(cfg["sae_checkpoints"]):]
    context_rows = {lang: data["validation"][lang][:cfg["context_rows"]] for lang in cfg["languages"]}
    tables = bilingual_dynamics(lambda step: ctx.input("models", ctx.key, step=step), steps,
                                data["train"]["tokens"], context_rows, token_languages, cfg, cfg["seed"],
                                ctx.stage.file("saes"), tokenizer=ctx.input("tokenizer"), progress=ctx.progress)
    _write_tables(ctx.stage, tables)
    _write_text_json(ctx.stage.file("token_languages.json"), token_languages.to_dict())
    write_json(ctx.stage.file("info.json"), {"steps": steps, "languages": cfg["languages"]})


SAE_TABLES = ("quality", "labels", "examples", "shares")


def _load_saes(st: Stage) -> dict:
    """``{"quality", "labels", "examples", "shares": DataFrames, "steps", "languages",
    "token_languages", "folder": where step_<n>/layer_<l> SAELens folders are}``."""
    from .features.language import TokenLanguages

    out = _load_tables(st, SAE_TABLES)
    out["token_languages"] = TokenLanguages.from_dict(read_json(st.file("token_languages.json")))
    return {**out, **read_json(st.file("info.json")), "folder": st.file("saes")}


register(StageKind("saes", "09", _saes_config,
                   lambda p, k: [("tokenizer", None), ("data", model_mixture(k)), ("models", k)],
                   _build_saes, _load_saes, keys=size_models))


def _build_stitching(ctx: BuildContext):
    """Bilingual, monolingual and random latents of the final model's SAEs stitched into the
    SAE checkpoints between the first and the final one (mid-training), per layer and
    language, over text batches of the test split."""
    import pandas as pd

    from .sae.dynamics import sae_folder
    from .sae.stitch import stitching_table
    from .sae.train import load_sae

    cfg = ctx.config
    saes = ctx.input("saes", ctx.key)
    data = ctx.input("data", model_mixture(ctx.key))
    steps = saes["steps"]
    final = ctx.input("models", ctx.key, step=steps[-1])
    n, b = cfg["stitch_rows"], cfg["stitch_batches"]
    batches = {lang: [data["test"][lang][i * n:(i + 1) * n] for i in range(b)
                      if len(data["test"][lang][i * n:(i + 1) * n])] for lang in cfg["languages"]}
    targets = steps[1:-1] or steps[:-1]
    if not targets:
        raise ValueError(f"stitching needs an SAE checkpoint before the final one; {ctx.key} has {steps}")
    labels = saes["labels"][saes["labels"]["step"] == steps[-1]]
    if "sae_seed" in labels:
        labels = labels[labels["sae_seed"] == 0]      # the first seed's SAEs are stitched
    final_saes = {int(layer): (load_sae(sae_folder(saes["folder"], steps[-1], int(layer))), lab)
                  for layer, lab in labels.groupby("layer")}
    parts = []
    for step in targets:
        target = ctx.input("models", ctx.key, step=step)
        for layer, (sae, lab) in final_saes.items():
            parts.append(stitching_table(target, final, sae, layer, batches, lab, cfg["languages"],
                                         seed=cfg["seed"], draws=cfg["control_draws"])
                         .assign(step=step, layer=layer))
    _write_tables(ctx.stage, {"stitching": pd.concat(parts, ignore_index=True)})


register(StageKind("stitching", "09", _stitching_config,
                   lambda p, k: [("data", model_mixture(k)), ("models", k), ("saes", k)],
                   _build_stitching, lambda st: _load_tables(st, ("stitching",))["stitching"],
                   keys=lambda p: size_models(p)[:1]))


# ------------------------------------------------------------ model diffing (chapter 08) -----

def _finetune_config(preset, key) -> dict:
    """A finetune of the base model: its variant (``diffing.VARIANTS``), budget, learning rate
    and the language parameters (the languages themselves are chosen from the base model's
    loss when the stage builds; a named weak language is checked here, before any work)."""
    from .diffing import VARIANTS

    if key not in VARIANTS:
        raise ValueError(f"unknown finetune {key!r}; allowed: {VARIANTS}")
    d, t = preset["diffing"], preset["training"]
    base = diffing_base(preset)
    trained = trained_languages(preset, base)
    for name in ("weak_language", "strong_language"):
        if d[name] is not None and d[name] not in trained:
            raise ValueError(f"diffing.{name} {d[name]!r} is not a language the base model {base} was "
                             f"trained on; allowed: {trained}")
    tokens = int(d["finetune_fraction"] * t["tokens"])
    # validation only before and after, on fewer tokens: in so short a run the evaluation
    # would otherwise cost as much as the training (the chapter scores on the test split)
    training = {**t, "tokens": tokens, "lr": d["finetune_lr_ratio"] * t["lr"], "n_checkpoints": 1,
                "eval_every": max(1, tokens // (t["batch_size"] * preset["models"]["n_ctx"])),
                "eval_tokens_per_language": min(t["eval_tokens_per_language"], 4096)}
    return {"base_model": base, "variant": key, "weak_language": d["weak_language"],
            "strong_language": d["strong_language"], "languages": list(preset["corpus"]["languages"]),
            "trained_languages": trained, "weights": preset["mixtures"]["weights"],
            "n_ctx": preset["models"]["n_ctx"], "training": training, "seed": preset["seed"] + 1}


def _finetune_upstream(preset, key) -> list:
    base = diffing_base(preset)
    return [("corpus", None), ("tokenizer", None), ("data", model_mixture(base)), ("models", base)]


def diffing_languages(preset, run: str | None = None, root=None) -> dict:
    """``{"weak", "strong", "table"}`` for the base model of ``run`` (from its final
    validation loss per language, ``diffing.choose_languages``)."""
    import pandas as pd

    from .diffing import choose_languages

    preset = _preset(preset)
    run = run or preset["name"]
    base = diffing_base(preset)
    metrics = read_metrics(run, base, root)
    last = metrics.dropna(subset=[c for c in metrics.columns if c.startswith("val_loss_")]).iloc[-1]
    val = {c[len("val_loss_"):]: float(last[c]) for c in metrics.columns if c.startswith("val_loss_")}
    d = preset["diffing"]
    weak, strong, table = choose_languages(val, trained_languages(preset, base), d["weak_language"],
                                           d["strong_language"])
    return {"weak": weak, "strong": strong, "table": pd.DataFrame(table)}


def _build_finetune(ctx: BuildContext):
    import torch

    from .artifacts import save_tensors
    from .data.datasets import build_mixture_dataset
    from .diffing import finetune_mixture
    from .models.config import config_from_dict
    from .models.train import train_model

    cfg = ctx.config
    base = cfg["base_model"]
    chosen = diffing_languages(ctx.preset, ctx.run, ctx.root)
    share, weights = finetune_mixture(ctx.key, cfg["languages"], mixture_share(ctx.preset, model_mixture(base)),
                                      cfg["weights"], chosen["weak"], chosen["strong"])
    corpus, tokenizer = ctx.input("corpus"), ctx.input("tokenizer")
    train, report = build_mixture_dataset(corpus, tokenizer, share, cfg["training"]["tokens"], cfg["n_ctx"],
                                          cfg["seed"], weights)
    base_model = ctx.input("models", base)
    base_folder = stage("models", ctx.run, base, ctx.root).path
    model_cfg = config_from_dict(read_json(base_folder / "config.json")["hooked_transformer"])
    data = ctx.input("data", model_mixture(base))
    summary = train_model(ctx.stage, model_cfg, train, data["validation"], cfg["training"], seed=cfg["seed"],
                          device=ctx.device, languages=cfg["languages"], progress=ctx.progress,
                          info={"model_name": f"{base}-ft-{ctx.key}", "base_model": base,
                                "finetune": ctx.key, "english_share": share},
                          init_state={k: v.detach().cpu() for k, v in base_model.state_dict().items()})
    save_tensors(ctx.stage.file("train.safetensors"), {"tokens": train["tokens"].to(torch.int32),
                                                       "language": train["language"]})
    _write_tables(ctx.stage, {"languages": chosen["table"]})
    write_json(ctx.stage.file("choice.json"), {"weak": chosen["weak"], "strong": chosen["strong"],
                                               "english_share": share, "weights": weights,
                                               "per_language": report})
    return {"summary": {k: v for k, v in summary.items() if k != "completed"}}


def _load_finetune(st: Stage, step: int | None = None, device: str = "cpu", part: str = "model"):
    """The finetuned model (``part="model"``), or its training rows (``"train"``), or the
    language choice (``"choice"``: weak, strong and the base model's loss table)."""
    from .artifacts import load_tensors
    from .models.load import load_model_from

    if part == "train":
        return load_tensors(st.file("train.safetensors"))["tokens"].long()
    if part == "choice":
        return {**read_json(st.file("choice.json")), "table": _load_tables(st, ("languages",))["languages"]}
    tok = stage("tokenizer", st.run, None, st.root)
    return load_model_from(st.path, tok.path if tok.is_complete() else None, step, device)


def _diff_clt_config(preset, key) -> dict:
    from .diffing import CLT_VARIANTS

    if key not in CLT_VARIANTS:
        raise ValueError(f"unknown further-trained CLT {key!r}; allowed: {CLT_VARIANTS}")
    d = preset["diffing"]
    # no warm-up of the sparsity penalty: the CLT is trained already
    clt = {**preset["clt"], "lambda_warmup_fraction": 0.0, "n_checkpoints": 1}
    offset = {"stagewise": 1, "mixture": 1, "strong": 1, "data_only": 1, "floor": 2}[key]
    return {"base_model": diffing_base(preset), "variant": key, "clt": clt,
            "tokens": int(d["clt_fraction"] * preset["clt"]["train_tokens"]), "seed": preset["seed"] + offset}


def _diff_clt_upstream(preset, key) -> list:
    from .diffing import CLT_MODEL

    base = diffing_base(preset)
    out = [("clt", base), ("models", base), ("data", model_mixture(base))]
    if CLT_MODEL.get(key):
        out.append(("finetunes", CLT_MODEL[key]))
    if key == "data_only":
        out.append(("finetunes", "weak"))
    return out


def _build_diff_clt(ctx: BuildContext):
    """The base CLT trained further (scales kept, no sparsity warm-up) on the model and text
    of its variant (``diffing`` module docstring)."""
    from .clt.activations import ActivationBuffer
    from .clt.formats import save_clt
    from .clt.train import train_clt
    from .diffing import CLT_MODEL

    from .device import default_device

    cfg = ctx.config
    base = cfg["base_model"]
    device = ctx.device or default_device()
    clt = ctx.input("clt", base)
    model = (ctx.input("finetunes", CLT_MODEL[ctx.key], device=device) if CLT_MODEL[ctx.key]
             else ctx.input("models", base, device=device))
    tokens = (ctx.input("finetunes", "weak", part="train") if ctx.key == "data_only"
              else ctx.input("data", model_mixture(base))["train"]["tokens"])
    c = cfg["clt"]
    source = ActivationBuffer(model, tokens, c["batch_tokens"], c["buffer_tokens"], seed=cfg["seed"],
                              context_length=c["context_length"])
    summary = train_clt(clt, source, cfg["tokens"], c, stage=ctx.stage, seed=cfg["seed"], device=device,
                        progress=ctx.progress, keep_scales=True)
    save_clt(clt.to("cpu"), ctx.stage.path)
    return {"summary": {k: v for k, v in summary.items() if k != "completed"}}


def _crosscoder_config(preset, key) -> dict:
    d = preset["diffing"]
    n_layers = preset["models"]["sizes"][key.split("-")[0]]["n_layers"]
    return {"base_model": key, "layers": sorted({0, n_layers // 2, n_layers - 1}),
            "expansion": d["crosscoder_expansion"], "k": d["crosscoder_k"], "tokens": d["crosscoder_tokens"],
            "train_tokens": d["crosscoder_train_tokens"], "seed": preset["seed"],
            "eval_tokens": preset["clt"]["eval_tokens"] // 4}


def _build_crosscoders(ctx: BuildContext):
    """A BatchTopK crosscoder on the base and the weak finetune's residual stream at each of
    the configured layers (``diffing.crosscoder_tables``)."""
    import torch

    from .artifacts import save_tensors
    from .diffing import crosscoder_tables

    cfg = ctx.config
    data = ctx.input("data", model_mixture(ctx.key))
    n_ctx = ctx.preset["models"]["n_ctx"]
    train_rows = data["train"]["tokens"][:max(1, cfg["tokens"] // n_ctx)]
    held = torch.cat([v[:max(1, cfg["eval_tokens"] // (n_ctx * len(data["validation"])))]
                      for v in data["validation"].values()])
    tables, tensors = crosscoder_tables(ctx.input("models", ctx.key), ctx.input("finetunes", "weak"), train_rows,
                                        held, cfg, progress=ctx.progress)
    save_tensors(ctx.stage.file("crosscoders.safetensors"), tensors)
    _write_tables(ctx.stage, tables)


CROSSCODER_TABLES = ("norms", "quality", "scaling")


def _diffing_config(preset, key) -> dict:
    d, f = preset["diffing"], preset["features"]
    return {"base_model": key, "languages": list(preset["corpus"]["languages"]),
            "trained_languages": trained_languages(preset, key), "parallel": f["parallel"],
            "max_rows": f["max_rows"], "batch_size": f["batch_size"], "dense_fraction": f["dense_fraction"],
            "min_frequency": f["min_frequency"], "min_concentration": f["min_concentration"],
            "bootstrap": f["bootstrap"], "seed": preset["seed"],
            "eval_tokens_per_language": preset["clt"]["eval_tokens"],
            "graph_batch_size": preset["graphs"]["batch_size"], "prompts_from": reference_model(preset),
            "middle_set": "changed beyond the floor, most active on the weak language first",
            **{k: d[k] for k in ("floor_quantile", "selection_rows", "reassembly_share", "transplant_draws",
                                 "transplant_rows")}}


def _diffing_upstream(preset, key) -> list:
    from .diffing import CLT_VARIANTS, VARIANTS

    return ([("corpus", None), ("tokenizer", None), ("data", model_mixture(key)), ("models", key), ("clt", key),
             ("graphs", reference_model(preset))]
            + [("finetunes", v) for v in VARIANTS] + [("diff_clts", v) for v in CLT_VARIANTS])


def _build_diffing(ctx: BuildContext):
    from .diffing import diffing_tables

    cfg = ctx.config
    base = ctx.key
    models = {"base": ctx.input("models", base), **{v: ctx.input("finetunes", v) for v in ("weak", "mixture", "strong")}}
    clts = {"base": ctx.input("clt", base), **{v: ctx.input("diff_clts", v) for v in
                                              ("stagewise", "floor", "data_only", "mixture", "strong")}}
    choice = ctx.input("finetunes", "weak", part="choice")
    prompts = ctx.input("graphs", cfg["prompts_from"])["prompts"]
    tables = diffing_tables(models, clts, ctx.input("data", model_mixture(base)), ctx.input("corpus"),
                            ctx.input("tokenizer"), choice["weak"], cfg, prompts=prompts, progress=ctx.progress)
    tables["languages"] = choice["table"]
    _write_tables(ctx.stage, tables)
    write_json(ctx.stage.file("info.json"), {"weak": choice["weak"], "strong": choice["strong"]})


DIFFING_TABLES = ("languages", "losses", "changes", "features", "transfer", "verses", "transplant", "selection",
                  "links")


def _load_diffing(st: Stage) -> dict:
    return {**_load_tables(st, DIFFING_TABLES), **read_json(st.file("info.json"))}


def _register_diffing_kinds() -> None:
    from .diffing import CLT_VARIANTS, VARIANTS

    register(StageKind("finetunes", "08", _finetune_config, _finetune_upstream, _build_finetune, _load_finetune,
                       keys=lambda p: list(VARIANTS)))
    register(StageKind("diff_clts", "08", _diff_clt_config, _diff_clt_upstream, _build_diff_clt, _load_clt,
                       keys=lambda p: list(CLT_VARIANTS)))
    register(StageKind("crosscoders", "08", _crosscoder_config,
                       lambda p, k: [("data", model_mixture(k)), ("models", k), ("finetunes", "weak")],
                       _build_crosscoders, lambda st: _load_tables(st, CROSSCODER_TABLES),
                       keys=lambda p: [diffing_base(p)]))
    register(StageKind("diffing", "08", _diffing_config, _diffing_upstream, _build_diffing, _load_diffing,
                       keys=lambda p: [diffing_base(p)]))


_register_diffing_kinds()


# ====================================================================== command line =====

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mlclt_utils.stages",
                                 description="Build one stage of a run, or list the run's stages.")
    ap.add_argument("command", choices=("build", "status"))
    ap.add_argument("stage", nargs="?", help="KIND or KIND/KEY, e.g. corpus, models/s-en50")
    ap.add_argument("--preset", default="tiny")
    # torchrun reads "--run" as its own "--run-path": under torchrun write "--run-name"
    ap.add_argument("--run", "--run-name", dest="run", default=None,
                    help="run name (default: the preset's name)")
    ap.add_argument("--root", default=None, help="artifact root (default $MLCLT_ARTIFACTS or ./artifacts)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--cache-dir", default=None, help="on-disk activation cache (CLT stages)")
    ap.add_argument("--set", dest="overrides", action="append", type=parse_override, default=[],
                    metavar="KEY=VALUE", help="preset override, e.g. training.tokens=100000")
    args = ap.parse_args(argv)
    try:
        preset = load_preset(args.preset, dict(args.overrides))
        run = args.run or preset["name"]
        if args.command == "status":
            main_run = run[:-len(BILINGUAL_SUFFIX)] if run.endswith(BILINGUAL_SUFFIX) else run
            runs = [(main_run, preset, chain(preset), ""),
                    (main_run + BILINGUAL_SUFFIX, bilingual_preset(preset), bilingual_chain(preset),
                     main_run + BILINGUAL_SUFFIX + "/")]
            for r, p, stages_of_run, prefix in runs:
                for kind, key in stages_of_run:
                    st = stage(kind, r, key, args.root)
                    try:
                        require_current(kind, p, r, key, args.root)
                        state = "current"
                    except StaleStage as err:
                        state = "stale: " + str(err).split("; rebuild")[0]
                    print(f"{prefix + st.name:24s} {state}")
            return 0
        preset = run_preset(preset, run)
        if not args.stage:
            ap.error("build needs a stage, e.g. models/s-en50")
        kind, _, key = args.stage.partition("/")
        options = {"cache_dir": args.cache_dir} if args.cache_dir else {}
        try:
            st = build(kind, preset, run, key or None, args.root, device=args.device, **options)
            if distributed.current().is_main:
                print(f"{st.name} ready: {st.path}")
        finally:
            distributed.cleanup()
    except (ValueError, StaleStage) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
