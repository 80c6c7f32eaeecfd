"""Execute notebooks in place and store them with their outputs (``make notebooks``).

The site (``make docs``) shows the stored outputs and never runs a notebook,
so a reader sees the results without running anything. Each notebook runs top
to bottom in a fresh kernel started in a scratch folder (as
``tests/test_notebooks.py`` runs them); a cell error stops with the cell named
and leaves the file untouched.

Figures: before the first cell the kernel registers a plotly renderer that
stores each figure twice, as plotly's own JSON (JupyterLab draws it) and as
HTML that calls ``Plotly.newPlot`` with the figure (the site draws it, with
the plotly.js it ships; no CDN). That setup cell is not stored. Outputs on
stderr (download and progress bars, warnings) are not stored either.

    .venv/bin/python docs/execute_notebooks.py notebooks/*.ipynb
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

SETUP = """\
import plotly.io as _pio
from plotly.io.base_renderers import MimetypeRenderer as _MimetypeRenderer


class _SiteRenderer(_MimetypeRenderer):
    count = 0

    def to_mimebundle(self, fig_dict):
        import plotly.io as pio

        type(self).count += 1
        html = pio.to_html(fig_dict, include_plotlyjs=False, full_html=False, validate=False,
                            default_height=fig_dict.get("layout", {}).get("height") or 450,
                            div_id=f"PREFIX-figure-{self.count}")
        return {"text/html": html}


_pio.renderers["dynalens_site"] = _SiteRenderer()
_pio.renderers.default = "plotly_mimetype+dynalens_site"
del _pio, _MimetypeRenderer, _SiteRenderer
"""


def execute(path: Path, timeout: int = 600) -> float:
    """Run ``path`` in a fresh kernel and write it back with its outputs; returns seconds."""
    notebook = nbformat.read(path, as_version=4)
    setup = nbformat.v4.new_code_cell(SETUP.replace("PREFIX", path.stem))
    notebook.cells.insert(0, setup)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        client = NotebookClient(notebook, kernel_name="python3", timeout=timeout,
                                resources={"metadata": {"path": scratch}})
        client.execute()  # raises CellExecutionError naming the cell
    seconds = time.perf_counter() - start
    notebook.cells.pop(0)
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        cell.execution_count = cell.execution_count - 1 if cell.execution_count else None
        cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
        for output in cell.outputs:
            if "execution_count" in output and output.execution_count:
                output.execution_count -= 1
        cell.metadata.pop("execution", None)  # run timestamps: noise in every diff
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the kernel inherits the environment
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for path in args.notebooks:
        print(f"{path}: {execute(path, args.timeout):.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
