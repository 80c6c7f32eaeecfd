"""The documentation: the site builds with --strict, the README's quickstart runs, nothing narrates history.

``mkdocs build --strict`` fails on a broken link or anchor, a page left out
of the navigation, and an API reference (``::: dynalens.x.Y``) that names
nothing; the second test shows that this configuration does fail on them.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
import yaml

import dynalens as dl

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md"))
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# How the history of development reads, as opposed to the software: "session 3",
# "this session", "the machine lent to ...". ("session storage" is a browser API.)
HISTORY = re.compile(r"\bsessions?\s*\d|\b(this|that|last|next|previous|earlier|later|each)\s+session\b|\blent to\b",
                     re.IGNORECASE)


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-P", "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_site_builds_strict_and_offline(tmp_path: Path):
    site = tmp_path / "site"
    done = mkdocs_build(ROOT / "mkdocs.yml", site)
    assert done.returncode == 0, done.stdout + done.stderr
    for page in ["index.html", "protocol/index.html", "api/probes/index.html", "notebooks/00_quickstart/index.html"]:
        assert (site / page).is_file(), page
    api = (site / "api" / "probes" / "index.html").read_text()
    assert "LogitLensResult" in api and "How many tokens to keep per layer" in api  # from the docstring
    assert (site / "javascripts" / "plotly.min.js").is_file()
    remote = re.compile(r"<script[^>]*\bsrc=\"https?://|<link[^>]*\bhref=\"https?://|import\(\"https?://")
    fetched = [p.relative_to(site) for p in site.rglob("*.html") if remote.search(p.read_text())]
    assert not fetched, f"pages load scripts or styles from the network: {fetched}"


def test_strict_build_fails_on_a_broken_link_and_a_missing_reference(tmp_path: Path):
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config["plugins"] = [p for p in config["plugins"] if not (isinstance(p, dict) and "mkdocs-jupyter" in p)]
    python = config["plugins"][-1]["mkdocstrings"]["handlers"]["python"]
    python["paths"] = [str(ROOT / path) for path in python["paths"]]
    config["hooks"] = [str(ROOT / hook) for hook in config["hooks"]]
    for page, text, expected in [
        ("link", "See [the missing page](missing.md).", "missing.md"),
        ("reference", "::: dynalens.probes.NoSuchAnalysis", "dynalens.probes.NoSuchAnalysis"),
    ]:
        docs = tmp_path / page / "docs"
        docs.mkdir(parents=True)
        (docs / "index.md").write_text(f"# A page\n\n{text}\n")
        config.update(docs_dir=str(docs), nav=["index.md"])
        (tmp_path / page / "mkdocs.yml").write_text(yaml.safe_dump(config))
        done = mkdocs_build(tmp_path / page / "mkdocs.yml", tmp_path / page / "site")
        assert done.returncode != 0, f"a {page} that is broken built: {done.stderr}"
        assert expected in done.stdout + done.stderr


def test_every_public_name_has_an_api_reference():
    """Each class and function of ``dl``, ``dl.models``, ``dl.probes``, ``dl.circuits``, ``dl.kernels``."""
    pages = "\n".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.md"))
    documented = {ref.rsplit(".", 1)[-1] for ref in re.findall(r"^::: ([\w.]+)", pages, re.M)}
    missing = [
        f"{module.__name__}.{name}"
        for module in (dl, dl.models, dl.probes, dl.circuits, dl.kernels)
        for name in module.__all__
        if not (name.isupper() or name.startswith("_") or name in documented or inspect.ismodule(getattr(module, name)))
    ]
    assert not missing, f"add a ::: directive to a page of docs/api/ for {missing}"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_readme_is_short_and_its_quickstart_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    commands = re.search(r"```\n(.*?)```", readme, re.S).group(1).split("\n")
    assert commands[0].startswith("make dashboard") and commands[1].startswith("make test")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile("\n".join(python_blocks(ROOT / "README.md")), "README.md", "exec"), namespace)
    assert namespace["prompts"].str_tokens[0] == ["<|im_start|>", "The", " capital", " of", " France", " is"]
    assert list(namespace["run"]) == ["logit_lens", "massive_activations", "head_scores"]
    assert sorted(p.name for p in (tmp_path / "runs" / "capitals").iterdir()) == [
        "head_scores.safetensors", "logit_lens.safetensors", "massive_activations.safetensors",
    ]  # fmt: skip
    assert type(dl.probes.Result.load(tmp_path / "lens.safetensors")).__name__ == "LogitLensResult"
    model = namespace["model"]
    assert model.generate("The capital of France is", max_new_tokens=4).startswith("The capital of France is Paris")


def test_the_protocol_page_example_analysis_runs(tmp_path: Path):
    namespace: dict = {}
    exec(compile(python_blocks(ROOT / "docs" / "protocol.md")[1], "protocol.md", "exec"), namespace)
    model = dl.load("lstm-hmm")
    prompts = dl.Prompts(model, [[1, 2, 3, 0, 1], [2, 2, 1]])
    result = namespace["FinalNorm"]()(model, prompts)
    frame = result.to_frame()
    assert list(frame["prompt"]) == [0] * 5 + [1] * 3 and frame["norm"].notna().all()
    result.save(tmp_path / "final_norm.safetensors")
    again = dl.probes.Result.load(tmp_path / "final_norm.safetensors")
    assert type(again).__name__ == "FinalNormResult"
    assert again.to_frame()["norm"].tolist() == pytest.approx(frame["norm"].tolist())
    assert list(dl.run(model, prompts, [namespace["FinalNorm"](), dl.probes.ResidualNorms()])) == [
        "final_norm", "residual_norms",
    ]  # fmt: skip


@pytest.mark.parametrize("path", [ROOT / "README.md", ROOT / "benchmarks" / "RESULTS.md", *PAGES],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_describe_the_software_not_its_history(path: Path):
    found = [m.group(0) for m in HISTORY.finditer(path.read_text())]
    assert not found, f"{path.relative_to(ROOT)} narrates development history: {found}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_stored_executed(path: Path):
    """The site shows stored outputs: every code cell ran (``make notebooks``), none failed."""
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    unrun = [i for i, cell in enumerate(code) if cell.execution_count is None]
    assert not unrun, f"{path.name}: code cells {unrun} have not run; `make notebooks` executes and stores them"
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), "cells ran out of order"
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
    markdown = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    assert not HISTORY.search(markdown)
