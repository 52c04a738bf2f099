"""Where a run's models and CLTs come from: trained by the chain (chapters 02 and 03), or
loaded, for users who are online: the multilingual-CLT study's released artifacts on the
Hugging Face hub, or a researcher's own GPT-2-style model in a local folder.

The preset's ``source`` section says which (``presets.py``; the ``causalnlp`` preset sets it):

* ``source.models``: ``None`` (train them), a template such as
  ``"CausalNLP/gpt2-hf_multilingual-{share}"`` (``{share}``: the English percent of the
  model's mixture, ``{size}``: its size name, ``{name}``: its name), or a mapping
  ``{model name: hub name or folder}``. Each is a ``transformers`` GPT-2 checkpoint with
  its tokenizer beside it (``models.hub``).
* ``source.clts``: the same for their CLTs, in the featflow layout (``clt.formats``): a hub
  repository, ``"repository:subfolder"``, or a folder. Needs ``source.models``.
* ``source.revision``: the hub revision (branch, tag or commit) for every hub name.
* ``source.clt_dtype`` / ``source.clt_input_convention``: how the CLTs are loaded.

A loaded model becomes the ``models/<name>`` stage, in the project's own format, with where
it came from (and the hub commit it resolved to) in its ``config.json``; the run's
tokenizer is the reference model's own (every model of a run must share it); a loaded CLT
becomes ``clt/<name>``. Every later stage reads them exactly as it reads trained ones.
The stage configurations hold the hub names, the revision asked for and, for a local folder,
its files' sizes and times, so the configuration hash names what was loaded.

Nothing here reaches the network unless a stage is built from a hub name; with no network,
a name that is not in the local cache fails with a message that says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

CLT_DTYPES = ("float32", "bfloat16", "float16")


def _spec(value, preset: Mapping, name: str, what: str) -> str | None:
    if value is None:
        return None
    from .models.config import parse_model_name

    size, share = parse_model_name(name)
    if isinstance(value, Mapping):
        if name not in value:
            raise ValueError(f"source.{what} names no {what[:-1]} for model {name!r}; it maps "
                             f"{sorted(value)}")
        return str(value[name])
    return str(value).format(share=round(share * 100), size=size, name=name)


def _fingerprint(path: Path) -> dict:
    """Sizes and modification times of a local folder's files (not their contents: reading
    gigabytes on every status check would be slow): a changed file changes the stage."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)
    return {str(p.relative_to(path)): [p.stat().st_size, p.stat().st_mtime_ns] for p in files}


def _describe(spec: str, revision: str | None) -> dict:
    repo, _, sub = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    local = Path(repo).expanduser()
    if local.is_dir():
        return {"path": str(local.resolve()), "files": _fingerprint(local)}
    if repo.startswith((".", "/", "~")):
        raise FileNotFoundError(f"source folder {repo!r} does not exist")
    return {"hub": repo, "subfolder": sub or None, "revision": revision}


def model_source(preset: Mapping, name: str) -> dict | None:
    """Where model ``name`` is loaded from (``None``: the chain trains it)."""
    spec = _spec(preset["source"]["models"], preset, name, "models")
    return None if spec is None else _describe(spec, preset["source"]["revision"])


def clt_source(preset: Mapping, name: str) -> dict | None:
    """Where the CLT of model ``name`` is loaded from (``None``: chapter 03 trains it)."""
    src = preset["source"]
    spec = _spec(src["clts"], preset, name, "clts")
    if spec is None:
        return None
    return {**_describe(spec, src["revision"]), "dtype": src["clt_dtype"],
            "input_convention": src["clt_input_convention"]}


def loads_models(preset: Mapping) -> bool:
    return preset["source"]["models"] is not None


def loads_clts(preset: Mapping) -> bool:
    return preset["source"]["clts"] is not None


def where(source: Mapping) -> str:
    """A short readable name of a source, without the machine's paths."""
    if "hub" in source:
        sub = f":{source['subfolder']}" if source.get("subfolder") else ""
        rev = f"@{source['revision']}" if source.get("revision") else ""
        return f"{source['hub']}{sub}{rev}"
    return f"local folder {Path(source['path']).name}"


def _offline_error(source: Mapping, err: Exception) -> OSError:
    return OSError(
        f"could not load {where(source)} from the Hugging Face hub or its local cache: "
        f"{type(err).__name__}: {err}. Without a network, download it once where there is one "
        "(the hub cache is HF_HOME), or give source.models / source.clts a local folder.")


def local_folder(source: Mapping, patterns: list[str] | None = None) -> tuple[Path, str | None]:
    """The folder holding ``source`` (downloaded from the hub when needed) and the hub
    commit it resolved to (``None`` for a local folder)."""
    if "path" in source:
        return Path(source["path"]), None
    from huggingface_hub import snapshot_download

    sub = source.get("subfolder")
    if sub:
        patterns = [f"{sub.strip('/')}/{p}" for p in (patterns or ["*"])]
    try:
        path = Path(snapshot_download(source["hub"], revision=source.get("revision"),
                                      allow_patterns=patterns))
    except Exception as err:          # offline, unknown repository, missing revision
        raise _offline_error(source, err) from None
    commit = path.name if path.parent.name == "snapshots" else None
    return (path / sub.strip("/") if sub else path), commit


MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]


def import_tokenizer(source: Mapping, n_ctx: int):
    """The tokenizer saved beside a model source, checked for the special ids every stage
    assumes (``<pad>`` 0, BOS 3, EOS 4)."""
    from transformers import AutoTokenizer

    from .tokenizer import check_run_tokenizer

    folder, _ = local_folder(source, MODEL_FILES)
    tok = AutoTokenizer.from_pretrained(str(folder))
    check_run_tokenizer(tok, where(source))
    tok.model_max_length = n_ctx
    return tok


def import_model(source: Mapping, name: str, n_ctx: int, tokenizer, device: str = "cpu"):
    """A GPT-2 checkpoint as the book's ``HookedTransformer`` (``models.hub``), checked to
    share the run's tokenizer and to hold contexts of ``n_ctx`` tokens; returns the model
    and ``{"source", "commit"}``."""
    from .models.hub import load_hf_gpt2

    folder, commit = local_folder(source, MODEL_FILES)
    model = load_hf_gpt2(str(folder), device=device)
    own = model.tokenizer
    if own is not None and own.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"model {name!r} ({where(source)}) has a tokenizer other than the run's "
                         "(the reference model's): the models of one run must share a tokenizer; "
                         "load models with different tokenizers in separate runs")
    if model.cfg.n_ctx < n_ctx:
        raise ValueError(f"model {name!r} ({where(source)}) holds {model.cfg.n_ctx} positions, "
                         f"fewer than models.n_ctx {n_ctx} of the preset")
    if model.cfg.d_vocab < len(tokenizer):
        raise ValueError(f"model {name!r} has {model.cfg.d_vocab} embeddings for a tokenizer of "
                         f"{len(tokenizer)} tokens")
    model.cfg.model_name = name
    return model, {"source": where(source), "commit": commit}


CLT_FILES = ["*.json", "*.safetensors"]


def import_clt(source: Mapping, model, device: str = "cpu", progress=print):
    """A CLT in the featflow layout, loaded for ``model`` as ``clt.formats.load_featflow_clt``
    does, at ``source["dtype"]``; returns the CLT and ``{"source", "commit", "size"}``."""
    import torch

    from .clt.formats import featflow_clt_size, load_featflow_clt

    folder, commit = local_folder(source, CLT_FILES)
    dtype = getattr(torch, source["dtype"])
    size = featflow_clt_size(folder, dtype)
    progress(f"CLT {where(source)}: {size['n_layers']} layers x {size['features_per_layer']:,} "
             f"features, {size['parameters']:,} parameters: {size['gigabytes']:.2f} GB in "
             f"{size['dtype']} (and one decoder block more while loading)")
    clt = load_featflow_clt(folder, model=model, device=device, dtype=dtype,
                            input_convention=source["input_convention"])
    return clt, {"source": where(source), "commit": commit, "size": size}


def check_source_section(src: Mapping[str, Any]) -> None:
    """The cross-key rules of the preset's ``source`` section (called by ``presets.validate``)."""
    from .clt.formats import INPUT_CONVENTIONS

    for key in ("models", "clts"):
        value = src[key]
        if value is not None and not isinstance(value, (str, Mapping)):
            raise ValueError(f"parameter 'source.{key}' must be a hub name or folder template "
                             f"(a string) or a mapping of model names to them, got {value!r}")
    if src["clts"] is not None and src["models"] is None:
        raise ValueError("parameter 'source.clts' is set but 'source.models' is not: loaded CLTs "
                         "need the models they were trained on")
    if src["clt_dtype"] not in CLT_DTYPES:
        raise ValueError(f"parameter 'source.clt_dtype' is {src['clt_dtype']!r}; allowed: {CLT_DTYPES}")
    if src["clt_input_convention"] not in INPUT_CONVENTIONS:
        raise ValueError(f"parameter 'source.clt_input_convention' is {src['clt_input_convention']!r}; "
                         f"allowed: {INPUT_CONVENTIONS}")


__all__ = ["model_source", "clt_source", "loads_models", "loads_clts", "where", "local_folder",
           "import_tokenizer", "import_model", "import_clt", "check_source_section", "CLT_DTYPES"]
