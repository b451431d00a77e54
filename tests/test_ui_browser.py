"""The MLflow view of a real sweep, rendered by a real browser: a tiny sweep logs to MLflow, `fomo-ray ui` serves
it, and headless Chromium renders the address `fomo-ray ui` prints (the runs table of the study view) and a trial's
chart page. Checks what a person sees: the training view, not MLflow 3's GenAI page; every trial with its
A_KA / A_ZS / GM in percent, the same numbers as the results table; the chart sections Summary, then Summary_full (the
full test sets at the ends), then Training, then the per-dataset ones. Skipped without a ``chromium`` binary (Debian package ``chromium``)."""
from __future__ import annotations

import html
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from fomo_ray.tracking import ui, writer

from _edges_util import free_port

CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.browser, pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(CHROMIUM is None, reason="needs a chromium binary (Debian: apt-get install chromium)")]


def _chromium(url: str, budget_ms: int, *what: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``url`` with a fresh profile (a new browser: MLflow 3 remembers no workflow)."""
    cmd = [CHROMIUM, "--headless", "--disable-gpu", "--window-size=1920,1200", f"--virtual-time-budget={budget_ms}",
           *what, url]
    if os.geteuid() == 0:
        cmd.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def render(url: str, budget_ms: int) -> str:
    """The DOM of ``url`` after the page's scripts ran for ``budget_ms`` of virtual time."""
    return _chromium(url, budget_ms, "--dump-dom").stdout


SHOTS = os.environ.get("FOMO_RAY_SCREENSHOTS", "")  # a directory: keep the screenshots there to look at them


def screenshot(url: str, name: str, tmp_path) -> None:
    """A PNG of ``url`` as a person sees it (kept under $FOMO_RAY_SCREENSHOTS when set); a page that did not draw
    (a blank or error page is a few KB) fails the test."""
    path = (tmp_path if not SHOTS else __import__("pathlib").Path(SHOTS)) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    _chromium(url, 20000, f"--screenshot={path}")
    assert path.is_file() and path.stat().st_size > 30_000, f"{url} drew no page ({path})"


def visible_text(dom: str) -> list[str]:
    """The page's text, one item per text node, in document order."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", "", dom, flags=re.S)
    return [html.unescape(t).strip() for t in re.split(r"<[^>]+>", dom) if t.strip()]


def rendered(url: str, wanted: list[str]) -> tuple[str, list[str]]:
    """(DOM, text) of ``url``, rendered again with more virtual time while a wanted string is missing (a slow API
    answer on a busy machine)."""
    dom, text = "", []
    for budget in (20000, 40000, 80000):
        dom = render(url, budget)
        text = visible_text(dom)
        if all(w in text for w in wanted):
            break
    return dom, text


def column_positions(dom: str) -> dict[str, int]:
    """``{column id: position}`` of the runs table's header cells. AG Grid places cells absolutely, so document
    order is not what one sees; ``aria-colindex`` is."""
    out = {}
    for cell in re.findall(r"<div[^>]*role=\"columnheader\"[^>]*>", dom):
        col, pos = re.search(r'col-id="([^"]*)"', cell), re.search(r'aria-colindex="(\d+)"', cell)
        if col and pos:
            out[html.unescape(col.group(1))] = int(pos.group(1))
    return out


def shows(text: list[str], value: float) -> bool:
    """Whether a number on the page is ``value`` rounded as displayed (MLflow shortens long decimals)."""
    for t in text:
        if re.fullmatch(r"-?\d+(\.\d+)?", t):
            decimals = len(t.split(".")[1]) if "." in t else 0
            if abs(float(t) - value) <= 0.5 * 10 ** -decimals + 1e-9:
                return True
    return False


@pytest.fixture(scope="module")
def finished_sweep(tiny_finished_sweep):
    """The session's 2 trials x 2 tasks of the real loop on the tiniest model, tracked in MLflow (tests/conftest.py,
    shared with test_sweep's end-to-end test and test_api.py): (its SweepResult, its output directory)."""
    return tiny_finished_sweep.out, tiny_finished_sweep.output_dir


@pytest.fixture(scope="module")
def ui_server(finished_sweep):
    """`fomo-ray ui` on the sweep's store: (the address it printed, its process); stopped by SIGTERM afterwards."""
    out, tmp = finished_sweep
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fomo_ray.cli", "ui", "--output-dir", str(tmp), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    printed = threading.Event()
    found: dict[str, str] = {}
    lines: list[str] = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"MLflow UI for \S+ at (http://\S+)", line)
            if m:
                found["url"] = m.group(1)
                printed.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert printed.wait(timeout=180), "fomo-ray ui printed no address:\n" + "".join(lines)
        yield found["url"], proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_the_printed_address_shows_every_trial_with_its_scores_first(finished_sweep, ui_server):
    out, _ = finished_sweep
    url, _ = ui_server
    names = sorted(out.trials["run"])
    heads = [writer.summary_key(k) for k in ("A_KA", "A_ZS", "GM")]
    dom, text = rendered(url, names + heads)
    assert "Runs" in text and "Overview" not in text, "not the runs table of the training view"
    for name in names:
        assert name in text, f"trial {name} is not on the page"
    sweep_name = out.directory.name
    assert out.parent_run_id and sweep_name not in text, "the sweep's parent run is listed among its trials"
    pos = column_positions(dom)
    scores = [pos[f"metrics.`{h}`"] for h in heads]
    others = [p for col, p in pos.items() if col.startswith(("params.", "tags.", "attributes.`Version`"))]
    assert scores == sorted(scores) and others and max(scores) < min(others), \
        f"A_KA, A_ZS, GM are not the first columns of the table, in that order: {pos}"
    final = out.results.sort_values("point").groupby("run").tail(1).set_index("run")
    for name in names:
        for key in ("A_KA", "A_ZS", "GM"):
            value = writer.as_percent(final.loc[name, key])
            assert shows(text, value), f"{name}: {key} = {value:.4f} % is not on the page"


def test_every_printed_page_opens_the_training_workflow(finished_sweep, ui_server, tmp_path):
    """`fomo-ray ui` prints the trials view, the sweeps view and the home page; in a new browser each opens MLflow's
    training pages (MLflow 3 opens GenAI ones otherwise: "Overview", "Traces" and "Sessions" of an experiment), and
    the sweeps view tells its columns apart within what the narrow headers show."""
    url, proc = ui_server
    base = url.split("/#/")[0]
    pages = {"trials": url, "sweeps": f"{base}/#/experiments/1/runs?workflowType=machine_learning"
             f"&viewStateShareKey={ui.SWEEPS_VIEW}", "home": f"{base}/#/?workflowType=machine_learning"}
    _, text = rendered(pages["sweeps"], ["Best/A_KA", finished_sweep[0].directory.name])
    for name in ("Best/A_KA", "Best/A_ZS", "Best/GM", "Median/A_KA", "Median/A_ZS", "Median/GM", "Trials/finished"):
        assert name in text, f"{name} is not a column of the sweeps view"
    logged = writer.sweep_metrics({k: [0.5] for k in ("A_KA", "A_ZS", "GM")}, {"finished": 1, "failed": 0})
    assert len({name[:12] for name in logged}) == len(logged), f"parent metrics alike in a header's width: {logged}"
    _, text = rendered(pages["home"], ["Model training"])
    assert "Sessions" not in text and "Traces" not in text, "the home page opened the GenAI workflow"
    for name, page in pages.items():
        screenshot(page, name, tmp_path)


def test_a_trials_overview_lists_what_its_sweep_varied_first(finished_sweep, ui_server, tmp_path):
    out, tmp = finished_sweep
    url, _ = ui_server
    tr = writer.Tracker(writer.default_uri(tmp), "fomo_ray")
    run = next(r for r in tr.children(out.parent_run_id) if r.info.run_name.endswith("-ema"))
    page = (f"{url.split('/#/')[0]}/#/experiments/{tr.experiment_id}/runs/{run.info.run_id}"
            "?workflowType=machine_learning")
    _, text = rendered(page, ["Swept/method.name", "variant"])
    shown = [t for t in text if t in run.data.params]
    assert shown[:6] == ["Swept/method.merge.weight", "Swept/method.name", "method.merge.weight", "method.name",
                         "name", "variant"] or shown[:4] == ["Swept/method.name", "Swept/method.merge.weight",
                                                              "method.name", "method.merge.weight"], shown[:8]
    assert run.data.params["name"] == run.data.params["variant"] == "ema"
    screenshot(page, "run_overview", tmp_path)


def test_the_compare_page_plots_the_swept_keys_by_default(finished_sweep, ui_server, tmp_path):
    """MLflow's compare page draws a parallel-coordinates plot of the first three differing params in sorted order:
    the swept keys (``Swept/...``), not budget settings."""
    import json

    out, tmp = finished_sweep
    url, _ = ui_server
    tr = writer.Tracker(writer.default_uri(tmp), "fomo_ray")
    ids = [r.info.run_id for r in tr.children(out.parent_run_id)]
    page = (f"{url.split('/#/')[0]}/#/compare-runs?runs={json.dumps(ids)}&experiments="
            f"{json.dumps([tr.experiment_id])}&workflowType=machine_learning").replace(" ", "")
    _, text = rendered(page, ["Parallel Coordinates Plot", "Parameters:", "Swept/method.name"])
    assert "Parallel Coordinates Plot" in text and "Parameters:" in text, text[:60]
    chosen = text[text.index("Parameters:") + 1:text.index("Metrics:")]  # the plot's axes, as its control lists them
    # the swept keys first: the merge weight (only the EMA trial has it) and the method; then the first other key
    assert [c for c in chosen if c][:2] == ["Swept/method.merge.weight", "Swept/method.name"], chosen
    screenshot(page, "compare", tmp_path)


def test_a_trials_chart_page_puts_summary_and_training_first(finished_sweep, ui_server, tmp_path):
    out, tmp = finished_sweep
    url, _ = ui_server
    tr = writer.Tracker(writer.default_uri(tmp), "fomo_ray")
    run = tr.children(out.parent_run_id)[0]
    base = url.split("/#/")[0]
    page = (f"{base}/#/experiments/{tr.experiment_id}/runs/{run.info.run_id}/model-metrics"
            "?workflowType=machine_learning")
    _, text = rendered(page, ["Summary", "Training"])
    # a section's title is followed by its chart count, "(3)"; the tab "Model metrics" is not
    sections = [t for t, after in zip(text, text[1:]) if re.fullmatch(r"\(\d+\)", after)]
    # the trajectory's summary, then the full test sets' (at the ends), then the training signal
    assert sections[:3] == ["Summary", "Summary_full", "Training"], sections
    assert len([s for s in sections if s.startswith("datasets/")]) == len(set(out.tidy["dataset"]))
    assert len([s for s in sections if s.startswith("datasets_full/")]) == len(set(out.tidy["dataset"]))
    assert "Model metrics" not in sections[:-1], "unprefixed metrics would form a section"
    screenshot(page, "charts", tmp_path)
