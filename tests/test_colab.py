"""The Colab cells of every chapter: current with _config.yml, and inert off Colab."""

import json
import subprocess
import sys
import types

import pytest

from mlclt_utils import colab


def test_every_chapter_starts_with_the_current_colab_cells():
    url = colab.repo_url()
    for path in sorted((colab.REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        assert cells[0]["cell_type"] == "markdown" and cells[0]["source"][0].startswith("# ")
        stamped = [{k: c[k] for k in ("cell_type", "metadata", "source")} for c in cells[1:3]]
        expected = [{k: c[k] for k in ("cell_type", "metadata", "source")}
                    for c in colab.colab_cells(url, path.name)]
        assert stamped == expected, f"{path.name}: run python -m mlclt_utils.colab"
        assert f"notebooks/{path.name})" in "".join(cells[1]["source"])


def test_colab_links_need_a_github_address():
    assert colab.colab_link("https://github.com/a/b.git", "02_x.ipynb") == \
        "https://colab.research.google.com/github/a/b/blob/main/notebooks/02_x.ipynb"
    with pytest.raises(ValueError, match="not a GitHub repository"):
        colab.colab_link("https://gitlab.com/a/b", "02_x.ipynb")


def test_the_install_cell_runs_pip_on_colab_only(monkeypatch):
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda args, check: calls.append(args))
    source = colab.install_source("https://github.com/a/b")
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    exec(source, {})
    assert calls == []
    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    exec(source, {})
    assert calls == [[sys.executable, "-m", "pip", "install", "-q", "mlclt_utils @ git+https://github.com/a/b"]]
