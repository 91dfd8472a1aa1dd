"""report.html: every section present, PNGs decode, no network references, and a real browser.

The browser test opens the page in headless Chromium (Debian's ``chromium`` and
``chromium-driver``, through selenium); it skips with a message where they are absent.
It checks that the console has no errors and that an interactive viewer's canvas is drawn,
and saves a full-page screenshot to ``$DFRN_ARTIFACTS`` (default: the test's tmp folder).
"""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import study_config

from dfrn.data.synth import make_demo_atlases
from dfrn.workflows.run import run_study


@pytest.fixture(scope="module")
def report(tiny_cohort, tmp_path_factory) -> Path:
    atlases = make_demo_atlases(tiny_cohort, n_parcels=12, seed=0)
    cfg = study_config(
        tiny_cohort,
        cohort={"covariates": ["age", "sex"]},
        confounds={"n_permutations": 99},
        baseline={"enabled": True, "atlas": str(atlases["parcellation"]),
                  "atlas_labels": str(atlases["parcellation"].with_name("parcellation_dseg.tsv")),
                  "n_permutations": 9},
        attention={"enabled": True, "atlas": str(atlases["regions"]),
                   "atlas_labels": str(atlases["regions"].with_name("regions_dseg.tsv")),
                   "template": str(tiny_cohort.template)},
    )
    out = tmp_path_factory.mktemp("report") / "res"
    res = run_study(cfg, out, progress=False, log=lambda s: None, permutations=1,
                    notes=("a note for the reader",))
    assert res.report == out / "report.html"
    return out / "report.html"


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _parse(text: str) -> list[tuple[str, dict[str, str | None]]]:
    p = _Collect()
    p.feed(text)
    return p.tags


def test_report_has_every_section_and_valid_images(report: Path) -> None:
    import html5lib

    text = report.read_text(encoding="utf-8")
    html5lib.parse(text, namespaceHTMLElements=False)  # parses as HTML5
    tags = _parse(text)
    ids = {a.get("id") for _, a in tags}
    for section in ("summary", "table1", "fig2", "confounds", "ridge", "permutation",
                    "attention", "methods", "prep"):
        assert section in ids, section
    assert "a note for the reader" in text and "Table 1" in text
    assert "Sanity check" in text and ("fails" in text or "passes" in text)
    assert "Top regions" in text and "Ridge baseline vs DFRN" in text
    assert "<h3>Network</h3>" in text and "<h3>Ridge baseline</h3>" in text  # both permutations
    assert {"fig2-img", "fig3-img", "fig4-img"} <= ids
    imgs = [a["src"] for t, a in tags if t == "img"]
    from PIL import Image

    for src in imgs:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    frames = [a["srcdoc"] for t, a in tags if t == "iframe"]
    assert len(frames) == 2  # one viewer per factor
    for doc in [text, *frames]:
        for tag, attrs in _parse(doc):
            for key in ("src", "href"):
                value = attrs.get(key) or ""
                assert not re.match(r"\s*(https?:)?//", value), (tag, key, value)


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_bin = shutil.which("chromedriver")
    if not chromium or not driver_bin:
        message = "headless Chromium is not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("DFRN_REQUIRE_BROWSER"):  # .ci/run installs it: never skip there
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(driver_bin), options=opts)


def test_report_in_a_real_browser(report: Path, tmp_path: Path) -> None:
    driver = _browser()
    try:
        driver.get(report.resolve().as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        frame = driver.find_elements("css selector", "iframe.viewer")[0]
        driver.switch_to.frame(frame)
        drawn = driver.execute_script("""
            const c = document.querySelector('canvas');
            if (!c) return -1;
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0;
            for (let i = 0; i < d.length; i += 4) { if (d[i] + d[i+1] + d[i+2] > 30) n++; }
            return n;
        """)
        assert drawn > 1000, drawn  # the viewer drew the brain, not a blank canvas
        driver.switch_to.default_content()
        # issue 17.22: each viewer's frame holds its content, with no scroll bar
        fits = driver.execute_script("""
            return [...document.querySelectorAll('iframe.viewer')].map(f => {
              const d = f.contentDocument.documentElement;
              return [d.scrollWidth, f.clientWidth, d.scrollHeight, f.clientHeight];
            });
        """)
        assert len(fits) == 2
        for sw, cw, sh, ch in fits:
            assert sw <= cw and sh <= ch, fits
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1200, min(int(height) + 100, 16000))
        out = Path(os.environ.get("DFRN_ARTIFACTS", tmp_path))
        out.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(out / "report.png"))
        assert (out / "report.png").stat().st_size > 10_000
        viewer = driver.find_elements("css selector", "iframe.viewer")[0]
        driver.execute_script("arguments[0].scrollIntoView()", viewer)
        assert viewer.screenshot(str(out / "report_viewer.png"))  # one whole viewer, to look at
    finally:
        driver.quit()


def _rewrite(report: Path, tmp_path: Path, edit) -> str:
    """Copy the report's results folder (without its large task folders), let ``edit``
    change it, write the report again and return its text."""
    from dfrn.workflows.report import write_report

    res = tmp_path / "res"
    shutil.copytree(report.parent, res,
                    ignore=shutil.ignore_patterns("tasks", "permutations", "cache"))
    edit(res)
    return write_report(res).read_text(encoding="utf-8")


def _section(text: str, section: str) -> str:
    return text.split(f'id="{section}"', 1)[1].split("<h2", 1)[0]


def test_p_values_print_as_table1_does(report: Path, tmp_path: Path) -> None:
    """Issue 17.20: a parametric p of 1.7e-19 was printed "0.0"; 0.0 is below the smallest double."""
    import pandas as pd

    from dfrn.evaluation.metrics import format_r_p

    def tiny_p(res: Path) -> None:
        path = res / "cv" / "permutation.tsv"
        df = pd.read_csv(path, sep="\t")
        df["p_parametric"] = [1.7e-19, 0.0]
        df.to_csv(path, sep="\t", index=False)

    perm = _section(_rewrite(report, tmp_path, tiny_p), "permutation")
    cells = re.findall(r"<td>([^<]*)</td>", perm.split("<h3>Ridge baseline</h3>")[0])
    assert "1.7e-19" in cells and "&lt; 1e-300" in cells, cells
    assert "0.0" not in cells and "0" not in cells, cells
    assert format_r_p(0.5, 1.7e-19) == "0.50 (1.7e-19)"  # Table 1 prints p the same way
    assert format_r_p(0.5, 0.0) == "0.50 (< 1e-300)"


def test_one_repeat_sd_is_shown_as_a_dash(report: Path) -> None:
    """Issue 17.21: an sd over one repeat is undefined, not "0.0"."""
    text = report.read_text(encoding="utf-8")
    section = _section(text, "ridge").split("Every pair of models")[0]  # the r table
    ridge = re.findall(r"<td>([^<]*)</td>", section)
    sds = re.findall(r"<th>(\w+_sd)</th>", section)
    assert {"dfrn_sd", "ridge_sd"} <= set(sds), sds
    assert ridge.count("—") == 2 * len(sds), ridge  # every model's sd, both factors
    assert "0.0" not in ridge and "0" not in ridge, ridge
    table1 = re.findall(r"<td>([^<]*)</td>", _section(text, "table1").split('id="fold-r"')[0])
    # the mean ± sd row, then the bootstrap CI of the mean
    assert all(re.search(r" ± — \[-?\d\.\d\d, -?\d\.\d\d\]$", c) for c in table1[-2:]), table1
    assert table1[-3] == "mean ± sd [95% CI]", table1


def test_p_and_sd_columns_are_formatted(tmp_path: Path) -> None:
    import pandas as pd

    from dfrn.workflows.report import _frame

    html = _frame(pd.DataFrame({"factor": ["a", "b"], "r": [0.9, 0.1], "p_parametric": [1.7e-19, 0.0],
                                "p_permutation": [0.001, 0.5], "dfrn_sd": [float("nan"), 0.05]}))
    assert "1.7e-19" in html and "&lt; 1e-300" in html and "0.001" in html
    assert "<td>—</td>" in html and "<td>0.05</td>" in html


def test_methods_name_the_baseline_column_neutrally(report: Path, tmp_path: Path) -> None:
    """Issue 17.23: the ROI features are sums of the [cohort] gm_column maps (here lesion
    maps), not necessarily gray-matter volumes."""
    methods = _section(report.read_text(encoding="utf-8"), "methods")
    assert "atlas-region sums of the &#39;gm&#39; maps (ml)" in methods
    assert "gray-matter" not in methods

    def lesion(res: Path) -> None:
        config = res / "config.toml"
        text = config.read_text(encoding="utf-8").replace('gm_column = "gm"', 'gm_column = "lesion"')
        assert 'gm_column = "lesion"' in text
        config.write_text(text, encoding="utf-8")

    methods = _section(_rewrite(report, tmp_path, lesion), "methods")
    assert "atlas-region sums of the &#39;lesion&#39; maps (ml)" in methods
    assert "gray-matter" not in methods


def test_beyond_the_covariates_section_verdicts_and_methods(report: Path) -> None:
    """Issue 18: the verdicts next to the table, Table 1's target, Methods and references."""
    import pandas as pd

    text = report.read_text(encoding="utf-8")
    section = _section(text, "confounds")
    summary = pd.read_csv(report.parent / "cv/confounds_summary.tsv", sep="\t")
    judged = summary[summary.model != "covariates"]
    assert {"dfrn", "ridge"} <= set(judged.model)
    assert len(judged) == 2 * judged.model.nunique()  # every brain model, two factors
    for row in judged.itertuples():
        assert row.verdict in section.replace("&#39;", "'"), row.verdict
        assert ("add nothing detectable" in row.verdict) == (row.p_delta_r2_permutation >= 0.05)
    assert "age and sex" in section and "cannot show" in section
    assert "Raw targets." in _section(text, "table1")
    methods = _section(text, "methods")
    assert "Freedman–Lane (99 permutations" in methods and "Dinga et al. 2020" in methods
    assert "Snoek L, Miletić S, Scholte HS (2019)" in text and "Winkler AM" in text


def test_where_is_the_signal_is_the_ablation_ranking(report: Path) -> None:
    """Issue 19: the headline ranks regions by delta_r with its CI; a voxel map that fails the
    sanity check is labelled image-driven."""
    import pandas as pd

    from dfrn.interpret.sanity import fails_sanity

    text = report.read_text(encoding="utf-8")
    where = _section(text.replace('<h3 id="where"', '<h2 id="where"'), "where")
    for column in ("delta_r", "ci_low", "ci_high", "mean_abs_change"):
        assert f"<th>{column}</th>" in where
    ranking = pd.read_csv(report.parent / "attention/region_ablation.tsv", sep="\t")
    assert ranking.loc[ranking["rank"] == 1, "region"].iloc[0] in where
    sanity = pd.read_csv(report.parent / "attention/sanity.tsv", sep="\t")
    voxel = text.split('id="voxel-regions">', 1)[1].split("</h3>", 1)[0]
    assert ("image-driven map" in voxel) == fails_sanity(sanity, "guided_backprop")
    assert "Zeiler MD, Fergus R (2014)" in text and "FeatureAblation" in _section(text, "methods")


def test_figure3_shows_the_covariates_bar(report: Path, monkeypatch, tmp_path: Path) -> None:
    import numpy as np
    from matplotlib.axes import Axes

    from dfrn.evaluation.bootstrap import Bootstrap, mean_r_ci
    from dfrn.workflows.baseline import run_baseline_stage
    from dfrn.workflows.results import ResultsFolder

    labels: list = []
    errors: list = []
    bar = Axes.bar

    def spy(self, *args, **kwargs):
        labels.append(kwargs.get("label"))
        errors.append((np.asarray(args[1]), np.asarray(kwargs.get("yerr"))))
        return bar(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "bar", spy)
    folder = ResultsFolder(report.parent)
    run_baseline_stage(folder.root, progress=False, log=lambda s: None)  # dfrn baseline RESULTS
    assert labels == ["Covariates only (age and sex)", "Ridge regression (ROI volumes)",
                      "Ridge regression (network input voxels)", "DFRN"]
    # the error bars are the 95% bootstrap CIs of the mean r, not the sd (one repeat: none)
    ci = mean_r_ci(folder.read_predictions(), Bootstrap(2000, seed=1))
    mean, err = errors[-1]
    assert err.shape == (2, 2)
    np.testing.assert_allclose(mean - err[0], ci["ci_low"], atol=1e-12)
    np.testing.assert_allclose(mean + err[1], ci["ci_high"], atol=1e-12)


def test_figure3_draws_no_error_bar_for_one_repeat(report: Path, monkeypatch, tmp_path: Path) -> None:
    """Issue 17.21: Figure 3 (in the report) drew a zero-length "± 0" bar for one repeat."""
    from matplotlib.axes import Axes

    from dfrn.plotting import plot_fig3
    from dfrn.workflows.results import ResultsFolder

    drawn: list = []
    bar = Axes.bar

    def spy(self, *args, **kwargs):
        drawn.append(list(kwargs.get("yerr")))
        return bar(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "bar", spy)
    folder = ResultsFolder(report.parent)
    plot_fig3(folder.read_metrics(folder.baseline_metrics), folder.read_metrics(),
              tmp_path / "fig3.png")
    assert len(drawn) == 2 and all(len(e) == 2 for e in drawn), drawn
    assert all(all(v != v for v in e) for e in drawn), drawn  # NaN: no bar, not a bar of 0


LESION_WARNING = "did not learn: the kept epoch is 1 of 50; try early_stopping = 'auto'"


@pytest.fixture(scope="module")
def lesion_report(report: Path, tmp_path_factory) -> Path:
    """The report rewritten as a lesion study shows it: ``intensity = "none"`` maps from a
    'lesion' column, and a hand-written ``cv/learning.tsv`` with warnings for one factor."""
    import pandas as pd

    def lesion(res: Path) -> None:
        config = res / "config.toml"
        text = config.read_text(encoding="utf-8")
        text = text.replace('intensity = "zscore"', 'intensity = "none"').replace(
            'image_column = "t1"', 'image_column = "lesion"')
        assert 'intensity = "none"' in text and 'image_column = "lesion"' in text
        config.write_text(text, encoding="utf-8")
        rows = [("anhedonia", 0, LESION_WARNING), ("anhedonia", 1, LESION_WARNING + " again"),
                ("sleep", 0, ""), ("sleep", 1, "")]
        pd.DataFrame({"factor": [f for f, _, _ in rows], "repeat": 0, "fold": [k for _, k, _ in rows],
                      "seed": 0, "task": [f"repeat-0_fold-{k}_{f}" for f, k, _ in rows],
                      "learned": [not w for _, _, w in rows], "warning": [w for _, _, w in rows],
                      }).to_csv(res / "cv/learning.tsv", sep="\t", index=False)

    tmp = tmp_path_factory.mktemp("lesion")
    _rewrite(report, tmp, lesion)
    return tmp / "res" / "report.html"


def test_viewer_frames_leave_no_empty_band(lesion_report: Path) -> None:
    """Issue 26.11: each viewer's frame ended ~50 px below its content (an empty band)."""
    driver = _browser()
    try:
        driver.get(lesion_report.resolve().as_uri())
        # the lowest visible element (the canvas, or the opacity slider where the viewer
        # lays it out below the canvas) against the frame's bottom
        boxes = driver.execute_script("""
            return [...document.querySelectorAll('iframe.viewer')].map(f => {
              const d = f.contentDocument, c = d.querySelector('canvas').getBoundingClientRect();
              const seen = [...d.body.querySelectorAll('*')].map(e => e.getBoundingClientRect())
                .filter(r => r.height > 0 && r.width > 0);
              const bottom = Math.max(...seen.map(r => r.bottom));
              return [c.top, bottom, f.clientHeight, d.documentElement.scrollHeight];
            });
        """)
    finally:
        driver.quit()
    assert len(boxes) == 2
    for top, bottom, frame, content in boxes:
        assert content <= frame, boxes  # nothing cut
        assert frame - bottom <= top + 1, boxes  # the gap below is the body margin above


def test_figure2_title_fits_for_one_and_five_factors(monkeypatch, tmp_path: Path) -> None:
    """Issue 26.12: with one factor the title was wider than the figure and cut at both ends."""
    import numpy as np
    import pandas as pd
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from dfrn.evaluation.metrics import compute_metrics
    from dfrn.plotting import plot_fig2

    saved: list[Figure] = []
    savefig = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig),
                                                                savefig(fig, *a, **k))[1])
    rng = np.random.default_rng(0)
    for factors in (["anhedonia"], ["anhedonia", "appetite", "sleep", "suicidality", "anxiety"]):
        y = rng.standard_normal((12, len(factors)))
        pred = pd.concat([pd.DataFrame({
            "participant_id": [f"s{i}" for i in range(12)], "repeat": 0, "fold": np.arange(12) % 2,
            "factor": f, "y_true": y[:, k], "y_pred": y[:, k] + rng.standard_normal(12)})
            for k, f in enumerate(factors)], ignore_index=True)
        plot_fig2(pred, compute_metrics(pred), tmp_path / f"fig2_{len(factors)}.png")
        fig = saved[-1]
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        title = fig.get_suptitle()
        assert "Out-of-fold predictions" in title.replace("\n", " ")
        texts = [fig._suptitle, *(ax.title for ax in fig.axes if ax.get_title())]
        for text in texts:
            box = text.get_window_extent(renderer)
            assert box.x0 >= 0 and box.x1 <= fig.bbox.x1, (len(factors), text.get_text(), box)
            assert box.y0 >= 0 and box.y1 <= fig.bbox.y1, (len(factors), text.get_text(), box)


def test_methods_name_lesion_maps_for_intensity_none(report: Path, lesion_report: Path) -> None:
    """Issue 26.14: binary lesion maps were called "T1-weighted images ... normalised (none"."""
    from dfrn.workflows.report import image_words

    methods = _section(lesion_report.read_text(encoding="utf-8"), "methods")
    assert ("participants&#39; lesion maps (image column &#39;lesion&#39;) on a common grid were "
            "used as they are (intensity none: no normalisation; 0 outside a brain mask)") in methods
    assert "T1-weighted" not in methods and "normalised (none" not in methods
    t1 = _section(report.read_text(encoding="utf-8"), "methods")
    assert "T1-weighted images on a common grid were normalised (zscore inside a brain mask)" in t1
    assert image_words(944, image_column="lesion_path", intensity="none").startswith(
        "944 participants' lesion maps (image column 'lesion_path') on a common grid were used "
        "as they are (intensity none: no normalisation)")
    assert image_words(5, image_column="t1", intensity="none").startswith(
        "5 participants' maps (image column 't1')")
    assert image_words(5, intensity="minmax", downsample=2) == (
        "5 participants' T1-weighted images on a common grid were normalised (minmax) and "
        "downsampled by 2.")


def test_training_curves_per_fold_in_the_report(report: Path) -> None:
    """Issue 27.3: train and validation loss per fold (repeat 0), the chosen epoch marked."""
    import json

    from dfrn.workflows.report import _training_histories
    from dfrn.workflows.results import ResultsFolder

    text = report.read_text(encoding="utf-8")
    assert 'id="training-curves-img"' in text
    assert (report.parent / "figures/training_curves.png").stat().st_size > 5_000
    hist = _training_histories(ResultsFolder(report.parent))
    assert sorted(set(zip(hist["factor"], hist["fold"], strict=True))) == [
        ("anhedonia", 0), ("anhedonia", 1), ("sleep", 0), ("sleep", 1)]
    for (factor, fold), g in hist.groupby(["factor", "fold"]):
        meta = json.loads((report.parent / f"cv/tasks/repeat-0_fold-{fold}_{factor}/task.json")
                          .read_text(encoding="utf-8"))
        assert set(g["chosen_epoch"]) == {meta["best_epoch"]}
        assert g["val_loss"].isna().all() and g["train_loss"].notna().all()  # val_fraction 0


def test_plot_training_curves_draws_each_fold_and_marks_the_chosen_epoch(
        monkeypatch, tmp_path: Path) -> None:
    import numpy as np
    import pandas as pd

    import dfrn.plotting as plotting

    figs: list = []
    monkeypatch.setattr(plotting, "_save", lambda fig, path, **k: figs.append(fig) or Path(path))
    epochs = np.arange(6)
    rows = []
    for factor in ("anhedonia", "sleep"):
        for fold, chosen in ((0, 2), (1, 4), (2, 1)):
            no_val = factor == "sleep" and fold == 2  # no validation split: only train loss
            rows.append(pd.DataFrame({
                "factor": factor, "fold": fold, "epoch": epochs, "train_loss": 1.0 - 0.1 * epochs,
                "val_loss": np.nan if no_val else 1.2 - 0.05 * epochs + 0.01 * fold,
                "chosen_epoch": chosen}))
    plotting.plot_training_curves(pd.concat(rows, ignore_index=True), tmp_path / "curves.png")
    axes = [ax for ax in figs[0].axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["anhedonia", "sleep"]
    for ax, n_val in zip(axes, (3, 2), strict=True):
        lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 6]
        assert sum(ln.get_linestyle() == "-" for ln in lines) == 3  # train, one per fold
        assert sum(ln.get_linestyle() == "--" for ln in lines) == n_val
        dots = sorted((float(ln.get_xdata()[0]), round(float(ln.get_ydata()[0]), 6))
                      for ln in ax.get_lines() if ln.get_marker() == "o")
        if ax.get_title() == "anhedonia":
            assert dots == [(1.0, 1.17), (2.0, 1.1), (4.0, 1.01)]  # on the validation curve
        else:
            assert dots == [(1.0, 0.9), (2.0, 1.1), (4.0, 1.01)]  # fold 2: on the train curve


def test_table1_shows_fold_r_and_learning_warnings(report: Path, lesion_report: Path,
                                                   tmp_path: Path) -> None:
    """Issue 27.3: per-fold r beside pooled r, and each factor's learning warnings in one line."""
    import pandas as pd

    from dfrn.evaluation.metrics import fold_r, fold_r_summary, readable
    from dfrn.workflows.report import _learning_context
    from dfrn.workflows.results import ResultsFolder

    section = _section(report.read_text(encoding="utf-8"), "table1")
    folder = ResultsFolder(report.parent)
    summary = fold_r_summary(fold_r(folder.read_predictions()), folder.read_metrics())
    cells = re.findall(r"<td>([^<]*)</td>", section.split('id="fold-r"', 1)[1])
    for row in readable(summary, 3).itertuples():
        i = cells.index(row.factor)
        assert cells[i + 1:i + 6] == [str(v) for v in (row.pooled_r, row.fold_r_mean,
                                                         row.fold_r_min, row.fold_r_max,
                                                         row.n_folds)], cells
    # a hand-written cv/learning.tsv: anhedonia's two networks did not learn, sleep's did
    warned = _section(lesion_report.read_text(encoding="utf-8"), "table1")
    items = re.findall(r"<li>(.*?)</li>", warned.split('id="learning-warnings"', 1)[1])
    assert items == ["<b>anhedonia</b>: 2 of 2 fold network(s) did not learn (e.g. "
                     "repeat-0_fold-0_anhedonia: the kept epoch is 1 of 50; try early_stopping = "
                     "&#39;auto&#39;)"], items
    # a folder of an older version, without cv/learning.tsv: no warnings, nothing fails
    old = ResultsFolder(tmp_path / "old")
    old.cv.mkdir(parents=True)
    shutil.copy(folder.predictions, old.predictions)
    context = _learning_context(old, folder.read_metrics())
    assert context["learning_warnings"] == [] and context["training_curves"] is None
    assert context["fold_r"] is not None
    assert len(pd.read_csv(folder.cv / "learning.tsv", sep="\t")) == 4  # the run's own table


def test_methods_claim_a_permutation_test_only_where_one_ran() -> None:
    """With residualised targets the ridges get no permutation test (Freedman–Lane covers
    them): the Methods must not say they had one."""
    from dfrn.workflows.report import _baseline_methods

    cfg = {"cohort": {}, "baseline": {"models_run": ["roi_ridge", "voxel_ridge"],
                                      "models_permuted": ["roi_ridge"]}}
    text = _baseline_methods(cfg)
    roi, voxel = text.split("A ridge regression")[1:]
    assert "with a permutation test" in roi and "permutation" not in voxel
    cfg["baseline"]["models_permuted"] = []
    assert "permutation" not in _baseline_methods(cfg)


def test_the_report_compares_every_model_pair_with_a_verdict(report: Path) -> None:
    """cv/comparison.tsv: the network vs each ridge and every brain model vs the covariates,
    for every factor; the report opens its ridge section with one verdict sentence per row
    and cites the test. 1 repeat × 2 folds gives 2 fold scores: no t-test, said so."""
    import pandas as pd

    from dfrn.workflows.comparison import verdict_sentence

    table = pd.read_csv(report.parent / "cv/comparison.tsv", sep="\t")
    pairs = [("dfrn", "ridge"), ("dfrn", "voxel_ridge"), ("dfrn", "covariates"),
             ("ridge", "covariates"), ("voxel_ridge", "covariates")]
    assert [tuple(p) for p in table[["model_a", "model_b"]].drop_duplicates().values] == pairs
    assert table.groupby(["model_a", "model_b"]).size().tolist() == [2] * 5  # both factors
    assert set(table["verdict"]) == {"no verdict: no corrected t-test: 2 fold score(s), it "
                                     "needs ≥ 3"}
    text = report.read_text(encoding="utf-8")
    section = _section(text, "ridge")
    items = re.findall(r"<li>([^<]*)</li>", section.split('id="comparison-verdicts"')[1])
    row = table[(table.model_a == "dfrn") & (table.model_b == "ridge")].iloc[0]
    import html

    assert html.unescape(items[0]) == f"DFRN vs ROI ridge, {verdict_sentence(row)}"
    assert len(items) == len(table)
    assert "Raw comparison: every model sees its inputs as they are" in section
    methods = text.split('id="methods"', 1)[1].split("</p>", 1)[0]
    assert "corrected resampled t-test" in methods and "Nadeau &amp; Bengio 2003" in methods
    assert "Bouckaert RR, Frank E (2004)" in text and "Efron B, Tibshirani RJ (1993)" in text
    cells = re.findall(r"<td>([^<]*)</td>", section.split("Every pair of models")[1])
    assert cells.count("—") == 3 * len(table), cells  # t, df and p: undefined, not "nan"
    assert "nan" not in [c.lower() for c in cells]
