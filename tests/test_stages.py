"""The stage mechanism on a real micro chain: skip if current, refuse or rebuild on stale
upstream stages, and survive being killed at any point."""

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CHAIN, MICRO, RUN, micro_preset
from mlclt_utils import stages
from mlclt_utils.artifacts import IN_PROGRESS_FILE, load_tensors
from mlclt_utils.stages import StaleStage, build, load, require_current, stage

REPO = Path(__file__).resolve().parent.parent


def test_every_stage_is_current_and_a_rebuild_does_nothing(micro_chain, micro):
    stamps = {}
    for kind, key in CHAIN:
        st = require_current(kind, micro, RUN, key, micro_chain)
        stamps[st.name] = st.manifest_path.stat().st_mtime_ns
    for kind, key in CHAIN:
        build(kind, micro, RUN, key, micro_chain, progress=False)
    assert stamps == {stage(k, RUN, key, micro_chain).name:
                      stage(k, RUN, key, micro_chain).manifest_path.stat().st_mtime_ns
                      for k, key in CHAIN}
    clt = stage("clt", RUN, "s-en50", micro_chain).manifest()
    assert set(clt["inputs"]) == {"models/s-en50", "data/en50"}
    assert clt["inputs"]["models/s-en50"] == stage("models", RUN, "s-en50", micro_chain).identity()
    assert "clt.safetensors" in clt["outputs"]


def test_upstream_rebuilt_under_another_config_is_refused_then_rebuilt(chain_copy, micro):
    other = micro_preset(**{"training.lr": 1e-3})
    build("models", other, RUN, "s-en50", chain_copy, progress=False)
    # the CLT on disk describes the old model: neither used nor reported as current
    with pytest.raises(StaleStage) as err:
        build("clt", micro, RUN, "s-en50", chain_copy, progress=False)
    message = str(err.value)
    assert "'models/s-en50'" in message and "training.lr" in message
    assert "mlclt_utils.runner --preset tiny --run micro --chapters 02" in message
    with pytest.raises(StaleStage, match="models/s-en50"):
        load("clt", micro, RUN, "s-en50", chain_copy)
    # under the configuration the model was rebuilt with, the CLT is stale and rebuilt
    with pytest.raises(StaleStage, match="built from other versions of \\['models/s-en50'\\]"):
        require_current("clt", other, RUN, "s-en50", chain_copy)
    before = stage("clt", RUN, "s-en50", chain_copy).identity()
    build("clt", other, RUN, "s-en50", chain_copy, progress=False)
    st = require_current("clt", other, RUN, "s-en50", chain_copy)
    assert st.manifest()["inputs"]["models/s-en50"] == stage("models", RUN, "s-en50", chain_copy).identity()
    assert st.identity() != before


def test_a_stage_of_another_data_budget_names_the_stage_and_key(chain_copy):
    other = micro_preset(**{"training.tokens": 16 * 32 * 8})
    with pytest.raises(StaleStage) as err:
        build("models", other, RUN, "s-en50", chain_copy, progress=False)
    assert "'data/en50'" in str(err.value) and "total_tokens: built with 6144, asked for 4096" in str(err.value)
    assert "--chapters 01" in str(err.value)


def test_pooled_rows_of_an_english_free_model_leave_english_out():
    preset = micro_preset(**{"mixtures.english_shares": [0.0, 0.5]})
    assert stages.trained_languages(preset, "s-en0") == ["fr"]
    assert stages.trained_languages(preset, "s-en50") == ["en", "fr"]
    assert stages.get_kind("clt_eval").config(preset, "s-en0")["pooled_languages"] == ["fr"]


def test_bad_keys_and_missing_stages_are_named(tmp_path, micro):
    with pytest.raises(ValueError, match="'s-en90' is not one of"):
        build("models", micro, RUN, "s-en90", tmp_path)
    with pytest.raises(ValueError, match="unknown stage kind 'model'"):
        build("model", micro, RUN, "s-en50", tmp_path)
    with pytest.raises(StaleStage, match="'corpus' of run 'micro' is not complete .it has not been built"):
        build("tokenizer", micro, RUN, None, tmp_path)


def test_an_interrupted_stage_is_not_complete(chain_copy, micro):
    st = stage("models", RUN, "s-en50", chain_copy)
    st.manifest_path.unlink()
    st.file(IN_PROGRESS_FILE).write_text("{}")
    with pytest.raises(StaleStage, match="a build of it is running or was interrupted"):
        load("models", micro, RUN, "s-en50", chain_copy)


def test_resume_of_a_stopped_training_equals_an_uninterrupted_one(chain_copy, micro):
    st = stage("clt", RUN, "s-en50", chain_copy)
    done = st.identity()
    shutil.rmtree(st.path)
    build("clt", micro, RUN, "s-en50", chain_copy, progress=False, max_steps_this_call=5)
    assert not st.is_complete() and st.file("resume.pt").exists()
    build("clt", micro, RUN, "s-en50", chain_copy, progress=False)
    assert st.manifest()["summary"]["resumed_from"] == 5
    assert st.identity() == done and not st.file("resume.pt").exists()


def test_command_line_status_and_build(chain_copy):
    sets = [a for k, v in MICRO.items() for a in ("--set", f"{k}={v!r}")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "mlclt_utils.stages", "status", "--run", RUN,
                          "--root", str(chain_copy), *sets], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    status = dict(line.split(None, 1) for line in out.stdout.splitlines())
    assert all(status[st] == "current" for st in ("corpus", "models/s-en50", "clt_eval/s-en50"))
    assert status["unit_stats/s-en50"].startswith("stale: stage 'unit_stats/s-en50' of run 'micro' "
                                                  "is not complete (it has not been built)")
    # chapter 09's bilingual run is listed under its own run name
    assert status["micro-bilingual/corpus"].startswith("stale: stage 'corpus' of run 'micro-bilingual'")
    assert "micro-bilingual/stitching/s-en50" in status
    bad = subprocess.run([sys.executable, "-m", "mlclt_utils.stages", "build", "models/s-en50",
                          "--run", RUN, "--root", str(chain_copy), *sets, "--set", "training.lr=0.01"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 0, bad.stderr      # the model itself is rebuilt ...
    stale = subprocess.run([sys.executable, "-m", "mlclt_utils.stages", "build", "clt/s-en50",
                            "--run", RUN, "--root", str(chain_copy), *sets],
                           capture_output=True, text=True, env=env, timeout=300)
    assert stale.returncode == 2 and "training.lr" in stale.stderr  # ... and the CLT refuses it


# ----------------------------------------------------------------- fault injection -------

def _build_in_child(kind, key, root, overrides):
    torch.set_num_threads(1)
    build(kind, micro_preset(**overrides), RUN, key, root, progress=False)


def _child(kind, key, root):
    ctx = multiprocessing.get_context("fork")
    return ctx.Process(target=_build_in_child, args=(kind, key, str(root), {}))


def _tensors(st):
    out = {}
    for f in sorted(st.path.rglob("*.safetensors")):
        for name, t in load_tensors(f).items():
            out[f"{f.relative_to(st.path)}:{name}"] = t
    return out


@pytest.mark.slow
def test_a_build_killed_at_a_random_point_reruns_to_the_same_outputs(tmp_path):
    """Each stage kind of the chain, killed by SIGKILL at a random moment of its build
    (three seeds), then rebuilt: same identity (config, inputs, every output file's hash)
    and the same tensors as an uninterrupted build."""
    clean = tmp_path / "clean"
    seconds = {}
    for kind, key in CHAIN:
        p = _child(kind, key, clean)
        t0 = time.time()
        p.start()
        p.join()
        seconds[kind] = time.time() - t0
        assert p.exitcode == 0, f"clean build of {kind} failed"
    rng = np.random.default_rng(0)
    for i, (kind, key) in enumerate(CHAIN):
        reference = stage(kind, RUN, key, clean)
        for seed in range(3):
            root = tmp_path / f"{kind}-{seed}"
            for up_kind, up_key in CHAIN[:i]:          # the upstream stages, as built
                src = stage(up_kind, RUN, up_key, clean).path
                shutil.copytree(src, root / src.relative_to(clean))
            p = _child(kind, key, root)
            p.start()
            p.join(timeout=float(rng.uniform(0.05, 1.0)) * seconds[kind])
            killed = p.is_alive()
            if killed:
                os.kill(p.pid, signal.SIGKILL)
            p.join()
            st = stage(kind, RUN, key, root)
            if killed and st.is_complete():
                # the signal came after the manifest was written: then every output file
                # must be whole and the stage identical to an uninterrupted build
                assert st.output_hashes(stages.get_kind(kind).volatile) == st.manifest()["outputs"]
                assert st.identity() == reference.identity(), f"{kind} looks complete after a kill"
            p = _child(kind, key, root)
            p.start()
            p.join()
            assert p.exitcode == 0, f"rerun of {kind} (seed {seed}) failed"
            assert st.identity() == reference.identity(), (kind, seed, killed)
            assert not st.file(IN_PROGRESS_FILE).exists()
            a, b = _tensors(st), _tensors(reference)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), kind


@pytest.mark.slow
def test_chapter_rerun_with_an_upstream_override_fails_naming_chapter_cell_and_stage(chain_copy):
    """Chapter 03 rerun with another training budget: the runner stops at the chapter and the
    cell, and the error names the stale stage and the command that rebuilds it."""
    params = [a for k, v in MICRO.items() for a in ("--param", f"{k}={v!r}")]
    env = dict(os.environ, MLCLT_ARTIFACTS=str(chain_copy), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "mlclt_utils.runner", "--preset", "tiny",
                          "--run", RUN, "--chapters", "03", "--no-build", *params,
                          "--param", "training.lr=0.01"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout[-3000:] + out.stderr[-3000:]
    assert "chapter 03_fit_clts failed in cell" in out.stderr
    assert "StaleStage" in out.stderr and "models/s-en50" in out.stderr
    partial = REPO / "book" / "chapters" / ".running.03_fit_clts.ipynb"
    assert partial.exists()          # kept for the reader to inspect, under a name the book skips
    partial.unlink()


def test_bilingual_stages_are_rebuilt_by_chapter_09_of_the_main_run():
    from mlclt_utils.presets import bilingual_preset
    from mlclt_utils.stages import bilingual_chain, rebuild_command, run_preset

    p = micro_preset(**{"bilingual.tokens": 1000})
    cmd = rebuild_command("corpus", bilingual_preset(p), "tiny-bilingual")
    assert "--chapters 09" in cmd and "--run" not in cmd and "bilingual.tokens=1000" in cmd
    assert run_preset(p, "tiny-bilingual")["corpus"]["languages"] == ["en", "ja"]
    assert run_preset(p, "tiny") is not None and run_preset(p, "tiny")["corpus"]["languages"] == ["en", "fr"]
    assert bilingual_chain(p)[-1] == ("stitching", "s-en50")
