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

from mkdocs.plugins import event_priority
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
    """Hard-link every package's ``.py`` files under ``target`` as the import path names them.

    Griffe follows symbolic links back to the real folder, hence hard links
    (a copy where the file system refuses them). The tree is updated in place,
    one atomic rename per changed file, so builds running at the same time
    (the test suite's workers) never see it half made.
    """
    wanted = set()
    for package, folder in package_dirs().items():
        out = target.joinpath(*package.split("."))
        out.mkdir(parents=True, exist_ok=True)
        for source in sorted(folder.glob("*.py")):
            link = out / ("__init__.py" if source.name == "_init.py" else source.name)
            wanted.add(link)
            if link.exists() and os.path.samefile(source, link):
                continue
            tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
            try:
                os.link(source, tmp)
            except OSError:
                shutil.copyfile(source, tmp)
            os.replace(tmp, link)
    for stale in [p for p in target.rglob("*.py") if p not in wanted]:  # modules since removed
        stale.unlink(missing_ok=True)
    return target


@event_priority(100)  # before mkdocstrings' on_config, which creates the python handler
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
