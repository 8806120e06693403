"""The declared plots draw what they name, offline: every plot of `dvc.yaml` has its fields in
the data the pipeline writes, and `dvc plots show` gives a page whose scripts are the vega files
shipped in docs/plots/vendor (no CDN), which a headless browser draws."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from dvc_project import DVC, REPO, run

from pipeline import paths
from pipeline.breakdown import breakdown, plot_rows
from pipeline.evaluation import tradeoff_points

METRICS = {"helpfulness": 1.25, "helpfulness_sft": 0.5, "harmless_rate": 0.9,
           "harmless_rate_sft": 0.6}


def _category_rows() -> list[dict]:
    pairs = pd.DataFrame({"prompt_id": ["a", "b"], "categories_0": [["Violence"], ["Drugs"]],
                          "categories_1": [[], []],
                          "severity_0": pd.array([2, 1], dtype="Int8"),
                          "severity_1": pd.array([0, 0], dtype="Int8")})
    scores = pd.DataFrame({"prompt_id": ["a", "b", "a", "b"],
                           "model": ["policy", "policy", "sft", "sft"],
                           "cost": [-1.0, -1.0, 1.0, -1.0]})
    return plot_rows(breakdown(scores, pairs, 100, 0)[2], min_support=30)


#: What the evaluate stage writes to each plot file, from the functions it calls.
DATA = {str(paths.EVAL_TRADEOFF): tradeoff_points(METRICS),
        str(paths.EVAL_CATEGORIES): _category_rows()}


def _declared() -> dict[str, dict]:
    body = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["evaluate"]
    return {k: v for item in body["plots"] for k, v in item.items()}


def test_every_evaluate_plot_declares_fields_its_data_has() -> None:
    declared = _declared()
    assert set(declared) == set(DATA)
    for path, spec in declared.items():
        template = json.loads((REPO / ".dvc" / "plots" / f"{spec['template']}.json").read_text())
        text = json.dumps(template)
        assert "<DVC_METRIC_X>" in text and "<DVC_METRIC_Y>" in text, path
        # SFT and policy told apart: the template encodes `model`, which every row has.
        assert '"field": "model"' in text, path
        rows = DATA[path]
        assert rows, path
        for row in rows:
            assert {spec["x"], spec["y"], "model"} <= set(row), (path, row)
        assert {r["model"] for r in rows} == {"sft", "policy"}
    assert declared[str(paths.EVAL_TRADEOFF)]["x"] == "helpfulness"
    assert declared[str(paths.EVAL_TRADEOFF)]["y"] == "harmless_rate"


def _project(tmp: Path) -> Path:
    """A DVC project with the repository's dvc.yaml, plot templates, offline page and vendored
    scripts, and the plot files as `evaluate` writes them."""
    run(["git", "init", "-q", "-b", "main"], tmp)
    run([str(DVC), "init", "-q"], tmp)
    for rel in ("dvc.yaml", ".dvc/config", ".dvc/plots", "docs/plots"):
        src, dest = REPO / rel, tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy2(src, dest)
    for path, rows in DATA.items():
        (tmp / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp / path).write_text(json.dumps(rows))
    run(["git", "add", "-A"], tmp)
    run(["git", "commit", "-qm", "plots"], tmp)
    return tmp


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = _project(tmp_path_factory.mktemp("plots"))
    run([str(DVC), "plots", "show", *DATA], root)
    return root / "dvc_plots" / "index.html"


def _specs(html: str) -> list[dict]:
    return [json.loads(m) for m in re.findall(r"var spec = (\{.*?\});\s*vegaEmbed", html, re.S)]


def test_the_page_loads_only_the_shipped_scripts(page: Path) -> None:
    html = page.read_text()
    scripts = re.findall(r"<script[^>]*\bsrc=\"([^\"]+)\"", html)
    assert len(scripts) == 3
    for src in scripts:
        assert not re.match(r"^[a-z]+:|^//", src), src  # no http(s)://, no protocol-relative
        assert (page.parent / src).resolve().is_file(), src
    assert "cdn." not in html and "https://cdn" not in html
    specs = _specs(html)
    assert len(specs) == 2
    by_title = {s["title"] if isinstance(s["title"], str) else s["title"]["text"]: s
                for s in specs}
    scatter = by_title["Safety vs helpfulness (SFT and policy)"]
    enc = scatter["encoding"]
    assert (enc["x"]["field"], enc["y"]["field"], enc["color"]["field"]) == \
        ("helpfulness", "harmless_rate", "model")
    assert {(r["model"], r["helpfulness"]) for r in scatter["data"]["values"]} == \
        {("sft", 0.5), ("policy", 1.25)}
    bars = by_title["Harmless rate per category (SFT and policy)"]["spec"]["encoding"]
    # Grouped side by side (an offset per model), never stacked to 2.0.
    assert bars["yOffset"]["field"] == "model" and bars["x"]["stack"] is None
    assert bars["x"]["scale"]["domain"] == [0, 1]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs chromium (docs/plots)")
def test_a_headless_browser_draws_both_plots(page: Path) -> None:
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--virtual-time-budget=10000", "--dump-dom",
         page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    # vega-embed marks each container it filled and draws each view on a canvas.
    assert dom.count('class="vega-embed') == 2
    assert dom.count("<canvas") == 2
