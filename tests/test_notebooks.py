"""Chapter sources are stored clean and parameterised the same way."""

import json
from pathlib import Path

import pytest

from mlclt_utils.runner import chapter_sources

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_toc_lists_every_notebook():
    assert [p.name for p in chapter_sources()] == [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean_with_one_parameters_cell(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), \
        f"{path.name} is stored with outputs; clear them"
    params = [c for c in code if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1, f"{path.name} has {len(params)} cells tagged 'parameters'"
    source = "".join(params[0]["source"])
    for name in ("preset", "run", "overrides"):
        assert f"{name} =" in source, f"{path.name}: parameters cell lacks {name!r}"
    assert nb["cells"][0]["cell_type"] == "markdown" and "".join(nb["cells"][0]["source"]).startswith("# ")


def test_executed_chapters_fold_code_and_drop_parameter_cells(tmp_path):
    import nbformat

    from mlclt_utils.runner import tidy_executed

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# title"),
                nbformat.v4.new_code_cell("preset = 'tiny'", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("preset = 'small'", metadata={"tags": ["injected-parameters"]}),
                nbformat.v4.new_code_cell("import x", metadata={"tags": ["remove-input"]}),
                nbformat.v4.new_code_cell("plot()")]
    path = tmp_path / "ch.ipynb"
    nbformat.write(nb, str(path))
    tidy_executed(path)
    tags = [c.metadata.get("tags", []) for c in nbformat.read(str(path), as_version=4).cells]
    assert tags[0] == [] and "remove-cell" in tags[1] and "remove-cell" in tags[2]
    assert tags[3] == ["remove-input"] and tags[4] == ["hide-input"]
