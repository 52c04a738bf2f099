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


def test_executed_chapters_lose_progress_bars_and_keep_warnings(tmp_path):
    import nbformat

    from mlclt_utils.runner import tidy_executed

    bars = ("train models/s-en0:  50%|#####     | 732/1464 [06:30<06:30,  1.9step/s]\r"
            "train models/s-en0: 100%|##########| 1464/1464 [13:02<00:00,  2.58step/s, loss=4.991]\n")
    warning = ("UserWarning: 3 of 40 prompts have no answer token\n"
               "SAE checkpoints s-en50 [1, 3, 12, 42, 146]; m-en50 [1, 3, 12, 42, 146]\n")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("train()", outputs=[
                    nbformat.v4.new_output("stream", name="stderr", text=bars),
                    nbformat.v4.new_output("stream", name="stderr", text=bars + warning),
                    nbformat.v4.new_output("stream", name="stdout", text="50%|#####| printed on purpose 1/2 [00:01<00:01, 1it/s]\n")])]
    path = tmp_path / "ch.ipynb"
    nbformat.write(nb, str(path))
    tidy_executed(path)
    outputs = nbformat.read(str(path), as_version=4).cells[0].outputs
    assert [o.name for o in outputs] == ["stderr", "stdout"]          # the bar-only output is gone
    assert outputs[0].text == warning                                  # the warning stays, its bars do not
    assert "printed on purpose" in outputs[1].text                     # stdout is the chapter's own text

