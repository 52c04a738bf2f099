"""The two cells every chapter starts with, for Colab: a link that opens the chapter's
source notebook there, and a cell that, on Colab only, installs this package from the
repository (keeping Colab's own torch: the package's requirements leave torch unpinned).

Both are built from the repository address in ``_config.yml`` (``repo_url``), so the
address lives in one place. After changing it, stamp the notebooks again:

    python -m mlclt_utils.colab          # rewrites the two cells of every notebooks/*.ipynb

Jupyter Book's own launch buttons are not used: they link the executed copies under
``book/chapters/``, which are not in the repository.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TAG = "colab"  # metadata tag of the stamped cells
BRANCH = "main"


def repo_url(config: Path = REPO / "_config.yml") -> str:
    """``repo_url`` of the book's ``_config.yml``."""
    import yaml

    cfg = yaml.safe_load(Path(config).read_text())
    try:
        return cfg["parse"]["myst_substitutions"]["repo_url"].rstrip("/")
    except (KeyError, TypeError):
        raise ValueError(f"{config} sets no parse.myst_substitutions.repo_url") from None


def colab_link(url: str, notebook: str, branch: str = BRANCH) -> str:
    """The Colab address of ``notebooks/<notebook>`` in the GitHub repository ``url``."""
    m = re.fullmatch(r"https://github\.com/([^/]+)/([^/]+?)(\.git)?", url)
    if not m:
        raise ValueError(f"repo_url {url!r} is not a GitHub repository address "
                         f"(https://github.com/OWNER/NAME); Colab opens notebooks from GitHub")
    return (f"https://colab.research.google.com/github/{m[1]}/{m[2]}/blob/{branch}/"
            f"notebooks/{notebook}")


def install_source(url: str) -> str:
    return ("# On Colab only: install this book's package from its repository, keeping Colab's\n"
            "# own torch (the package leaves torch unpinned). Elsewhere this cell does nothing.\n"
            "import subprocess, sys\n"
            "\n"
            "if \"google.colab\" in sys.modules:\n"
            "    subprocess.run([sys.executable, \"-m\", \"pip\", \"install\", \"-q\",\n"
            f"                    \"mlclt_utils @ git+{url}\"], check=True)")


def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    return [line + "\n" for line in lines[:-1]] + [lines[-1]]


def colab_cells(url: str, notebook: str) -> list[dict]:
    """The markdown link cell and the install cell of ``notebook`` (a file name)."""
    link = {"cell_type": "markdown", "id": "colab-link", "metadata": {"tags": [TAG]},
            "source": _lines(f"[Open this chapter in Colab]({colab_link(url, notebook)}) "
                             "(Runtime → Change runtime type → GPU, then run all cells).")}
    install = {"cell_type": "code", "execution_count": None, "id": "colab-install",
               "metadata": {"tags": [TAG, "remove-cell"]},
               "outputs": [], "source": _lines(install_source(url))}
    return [link, install]


def stamp(path: Path, url: str) -> bool:
    """Put the Colab cells right after the notebook's title cell (replacing earlier ones);
    returns whether the file changed."""
    path = Path(path)
    text = path.read_text()
    nb = json.loads(text)
    cells = [c for c in nb["cells"] if TAG not in c.get("metadata", {}).get("tags", [])]
    nb["cells"] = cells[:1] + colab_cells(url, path.name) + cells[1:]
    new = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    if new != text:
        path.write_text(new)
    return new != text


def main() -> None:
    url = repo_url()
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        if stamp(path, url):
            print(f"stamped {path.name}")


if __name__ == "__main__":
    main()
