"""report.html opened in headless Debian chromium: it renders, every picture loads, the per-class tables are there."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
LABELS = ["negative", "neutral", "positive"]
# name, method, test rows predicted wrong, trainable parameters by part (adapter, head, prompt, other)
METHODS = [("full", "full", 6, (0, 99, 0, 18_730)), ("lora", "lora", 12, (1_024, 99, 0, 0)),
           ("prompt_tuning", "prompt_tuning", 24, (0, 99, 128, 0))]
PROBE = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  document.body.dataset.images = images.length;
  document.body.dataset.loaded = images.filter((i) => i.complete && i.naturalWidth > 0).length;
  images.forEach((i) => i.setAttribute("data-natural", i.naturalWidth + "x" + i.naturalHeight));
});
</script>"""


def chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--virtual-time-budget=5000", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory as `peftlab run` leaves it (results, saved test predictions), then its report."""
    if not Path(CHROMIUM).is_file() or shutil.which(CHROMIUM) is None:
        pytest.skip(f"Debian chromium not found at {CHROMIUM} (apt-get install chromium) -- the page is not rendered")
    import numpy as np

    from peftlab.evaluate import classification_metrics, confusion, per_class_report
    from peftlab.report import write_report
    from peftlab.results import (
        EpochRecord,
        ExperimentResult,
        ParameterParts,
        RunResult,
        SavedPredictions,
        save_predictions,
    )

    folder = tmp_path_factory.mktemp("report page") / "run"  # a space in the path, as users' folders have
    true = np.arange(60) % 3
    runs = []
    for index, (name, method, wrong, (adapter, head, prompt, other)) in enumerate(METHODS):
        predicted = true.copy()
        predicted[np.random.default_rng(index).permutation(60)[:wrong]] += 1
        predicted %= 3
        save_predictions(folder / name / "test_predictions.jsonl",
                         SavedPredictions(LABELS, true, predicted, np.eye(3)[predicted]))
        parts = ParameterParts(adapter=adapter, head=head, prompt=prompt, other=other, base=18_829)
        history = [EpochRecord(epoch=e, step=8 * e, train_loss=1.0 / e, eval_loss=1.1 / e,
                               metrics={"f1_macro": 0.5 + 0.1 * e, "accuracy": 0.5 + 0.1 * e}) for e in (1, 2)]
        runs.append(RunResult(
            name=name, method=method, task="classification", seed=42, trainable_params=parts.trainable,
            total_params=18_829 + adapter + prompt + (head if method != "full" else 0), parameter_parts=parts,
            model_size_bytes=4 * parts.trainable, wall_time_s=3.0 + index, train_samples_per_s=20.0,
            peak_rss_bytes=2**29, optimizer_state_bytes=8 * parts.trainable, best_epoch=2,
            best_metric_name="f1_macro", best_metric=0.7, history=history,
            test_metrics={"loss": 0.5, **classification_metrics(true, predicted, 3)},
            per_class=per_class_report(true, predicted, LABELS), confusion_matrix=confusion(true, predicted, 3),
            predictions_file=f"{name}/test_predictions.jsonl"))
    experiment = ExperimentResult(
        name="page", task="classification", config={"model": {"path": "tiny"}, "data": {"path": "shipped:reviews"}},
        data_report={"source": "/site-packages/peftlab/resources/data/reviews.csv", "format": "csv", "raw_rows": 200,
                     "kept_rows": 198, "dropped": {"missing_label": 2},
                     "dropped_examples": {"missing_label": ["/site-packages/peftlab/resources/data/reviews.csv line 7"]},
                     "split_sizes": {"train": 100, "validation": 38, "test": 60}, "class_counts": {},
                     "max_length": 32, "notes": [], "warnings": []},
        runs=runs, environment={"device": "cpu", "seed": 42})
    write_report(experiment, folder)
    return folder


def test_report_page_renders_with_every_picture_and_table(run_dir: Path) -> None:
    probe = run_dir / "probe.html"  # beside report.html: the same page with the probe script before </body>
    probe.write_text((run_dir / "report.html").read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                     encoding="utf-8")
    dom = chromium("--dump-dom", probe.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stdout[-2000:]
    images = int(re.search(r'data-images="(\d+)"', body.group(0)).group(1))  # type: ignore[union-attr]
    loaded = int(re.search(r'data-loaded="(\d+)"', body.group(0)).group(1))  # type: ignore[union-attr]
    # loss, quality, costs, pareto, test quality with intervals, and one confusion matrix per method
    assert images == loaded == 5 + len(METHODS)
    sizes = re.findall(r'data-natural="(\d+)x(\d+)"', dom.stdout)
    assert len(sizes) == images and all(int(w) > 100 and int(h) > 100 for w, h in sizes)
    for name, *_ in METHODS:
        assert f'alt="Confusion matrix: {name}"' in dom.stdout
    # The per-class tables: one per method, each class a row.
    section = dom.stdout.split("<h2>Per-class test results</h2>")[1].split("<h2>")[0]
    assert len(re.findall(r"<th>class</th>\s*<th>precision</th>\s*<th>recall</th>", section)) == len(METHODS)
    for label in ("negative", "neutral", "positive"):
        assert section.count(f"<td>{label}</td>") == 2 * len(METHODS)  # per-class row and confusion-matrix row
    assert "<h2>Trainable parameters by part</h2>" in dom.stdout and "<h2>Environment</h2>" in dom.stdout
    assert "<code>shipped:reviews</code>" in dom.stdout and "site-packages" not in dom.stdout

    screenshot = run_dir / "page.png"
    shot = chromium(f"--screenshot={screenshot}", "--window-size=1200,1600", (run_dir / "report.html").as_uri())
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    data = screenshot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == (1200, 1600)
    assert len(data) > 50_000  # tables and plots, not a blank page
