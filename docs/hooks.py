"""MkDocs hooks of the dynalens site (``mkdocs.yml``: ``hooks``).

- **API sources.** ``pyproject.toml`` maps the top-level folders into the one
  namespace ``dynalens`` (``package-dir``: ``probes/`` is ``dynalens.probes``),
  a layout mkdocstrings' static reader (griffe) cannot follow. Before the
  build, :func:`on_config` lays out ``build/docs-api/dynalens/...`` as hard
  links to the real files (a package's ``_init.py`` as its ``__init__.py``), and
  ``mkdocs.yml`` points the python handler there. Nothing is imported.
- **Figures.** The stored notebooks draw their plotly figures with
  ``Plotly.newPlot`` (``make notebooks`` executes them with that renderer).
  :func:`on_post_page` loads plotly.js on the pages that have figures, from
  the copy that :func:`on_post_build` takes from the installed plotly package,
  and drops the CDN scripts (MathJax, RequireJS, Mermaid) that the notebook
  template adds: the site needs no network, to build or to read.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tomllib
from pathlib import Path

from mkdocs.utils import get_relative_url

ROOT = Path(__file__).resolve().parents[1]
API_SOURCES = ROOT / "build" / "docs-api"
PLOTLY_JS = "javascripts/plotly.min.js"
_CDN_SCRIPT = re.compile(r"<script[^>]*\bsrc=\"https?://[^\"]*\"[^>]*>\s*</script>|"
                         r"<script type=\"module\">(?:(?!</script>).)*?https?://.*?</script>", re.S)


def package_dirs(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, Path]:
    """Package name → its folder, from ``[tool.setuptools] package-dir``."""
    setuptools = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]
    mapping = setuptools.get("package-dir", {})
    return {name: ROOT / mapping.get(name, name.replace(".", "/")) for name in setuptools["packages"]}


def lay_out_sources(target: Path = API_SOURCES) -> Path:
    """Hard-link every package's ``.py`` files under ``target`` as the import path names them."""
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for package, folder in package_dirs().items():
        out = tmp.joinpath(*package.split("."))
        out.mkdir(parents=True, exist_ok=True)
        for source in sorted(folder.glob("*.py")):
            name = "__init__.py" if source.name == "_init.py" else source.name
            try:
                os.link(source, out / name)  # griffe follows symlinks back to the real folder
            except OSError:
                shutil.copyfile(source, out / name)
    shutil.rmtree(target, ignore_errors=True)
    try:
        tmp.rename(target)
    except OSError:  # another build laid the same links out at the same moment
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def on_config(config):
    lay_out_sources()
    return config


def plotly_js() -> Path:
    spec = importlib.util.find_spec("plotly")
    return Path(spec.origin).parent / "package_data" / "plotly.min.js"


def on_post_page(output: str, page, config) -> str:
    if not page.file.src_uri.endswith(".ipynb"):
        return output
    output = _CDN_SCRIPT.sub("", output)
    if "Plotly.newPlot" in output:
        script = f'<script src="{get_relative_url(PLOTLY_JS, page.url)}"></script>'
        output = output.replace("</head>", script + "\n</head>", 1)
    return output


def on_post_build(config) -> None:
    target = Path(config["site_dir"]) / PLOTLY_JS
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plotly_js(), target)
