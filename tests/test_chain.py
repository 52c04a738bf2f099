"""The tiny chain end to end, then the book build in strict mode."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_tiny_chain_and_book(tmp_path):
    env = dict(os.environ, MLCLT_ARTIFACTS=str(tmp_path / "artifacts"))
    done = subprocess.run([sys.executable, "-m", "mlclt_utils.runner", "--preset", "tiny"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    html = REPO / "_build" / "html"
    for chapter in ("00_overview", "01_data_tokenizer", "02_train_models", "03_fit_clts",
                    "04_shared_features", "05_language_features", "06_attribution_graphs",
                    "07_language_interventions", "08_model_diffing", "09_bilingual_saes", "10_lingua_franca_neurons"):
        page = html / "book" / "chapters" / f"{chapter}.html"
        assert page.exists(), f"{page} was not built"
    # executed chapters carry their figures as images, so the book reads without a kernel
    assert "<img" in (html / "book" / "chapters" / "02_train_models.html").read_text()
    # ... and no progress-bar text: the bars went to the runner's log
    import nbformat

    from mlclt_utils.runner import is_progress

    for executed in sorted((REPO / "book" / "chapters").glob("*.ipynb")):
        for cell in nbformat.read(str(executed), as_version=4).cells:
            for out in cell.get("outputs", []):
                text = out.get("text", "")
                assert not any(is_progress(line) for line in text.splitlines()), \
                    f"{executed.name} carries progress output: {text[:200]!r}"
    for page in sorted(html.rglob("*.html")):
        text = page.read_text()
        assert not fetched_from_network(text), f"{page.name} fetches {fetched_from_network(text)}"
        for private in (str(REPO), str(tmp_path)):
            assert private not in text, f"{page.name} prints the build machine's path {private}"
    # the bilingual run of chapter 09 holds its two languages and nothing else
    from mlclt_utils import stages
    from mlclt_utils.presets import bilingual_preset, load_preset

    bi = bilingual_preset(load_preset("tiny"))
    data = stages.load("data", bi, "tiny-bilingual", "en50", root=tmp_path / "artifacts")
    assert data["languages"] == ["en", "ja"]
    assert set(data["train"]["language"].unique().tolist()) == {0, 1}
    assert set(data["validation"]) == set(data["test"]) == {"en", "ja"}
    # a rerun finds every stage up to date and repeats cleanly
    again = subprocess.run([sys.executable, "-m", "mlclt_utils.runner", "--preset", "tiny",
                            "--chapters", "01", "--no-build"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]


def test_runner_refuses_bad_preset_before_work():
    done = subprocess.run([sys.executable, "-m", "mlclt_utils.runner", "--preset", "huge"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "unknown preset 'huge'" in done.stderr


def fetched_from_network(html: str) -> list[str]:
    """Scripts and stylesheets a page loads from the network (a test of the test below)."""
    scripts = re.findall(r"<script[^>]*\ssrc=[\"'](https?:)?//([^\"']+)", html)
    sheets = [m for m in re.findall(r"<link[^>]*>", html)
              if "stylesheet" in m and re.search(r"href=[\"'](https?:)?//", m)]
    return [s[1] for s in scripts] + sheets


def test_network_check_sees_remote_scripts_and_sheets():
    assert fetched_from_network('<script src="https://cdn.x/require.js"></script>') == ["cdn.x/require.js"]
    assert fetched_from_network('<link rel="stylesheet" href="//fonts.x/a.css">')
    assert not fetched_from_network('<script src="../_static/a.js"></script><link rel="stylesheet" href="_static/b.css">')
    assert not fetched_from_network('<script>const u = "https://unpkg.com/thebe";</script>')
