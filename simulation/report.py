"""What a simulation writes: tidy results, plots, and a report a clinician-researcher can read.

```
out/results.csv          protocol x strategy x train sites x test site x metric x seed,
                         with bootstrap 95 % intervals (FLamby-style tidy rows); ``warning``
                         says why a row's test split lacks a class
out/sites.csv            size, per-split positives and prevalence of each virtual hospital
out/curves.csv/.png      federated AUROC/AUPRC per site and round
out/heatmap_auroc.png    train site x test site AUROC (local models, centralized, federated)
out/heatmap_auprc.png
out/importance.csv/.png  which variables the model attends to
out/privacy.csv          epsilon spent per site (DP runs)
out/report.md            all of the above in one page
```
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: simulations run on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from hymate.files import atomic_write_text, write_csv  # noqa: E402
from server.run_dir import RunDirectory  # noqa: E402

RESULT_COLUMNS = [
    "protocol",
    "strategy",
    "train_sites",
    "test_site",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n",
    "positives",
    "seed",
    "warning",
]


def results_frame(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def curves_frame(runs: dict[str, Path]) -> pd.DataFrame:
    """Per-round, per-site evaluation metrics of every federated run."""
    frames = []
    for label, path in runs.items():
        run = RunDirectory(path)
        if run.is_finished():
            frames.append(run.evaluation_curves().assign(run=label))
    return (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=["run", "round", "site", "metric", "value"])
    )


def privacy_frame(runs: dict[str, Path]) -> pd.DataFrame:
    """Epsilon spent per site of every finished federated run (none for runs without DP)."""
    rows = []
    for label, path in runs.items():
        run = RunDirectory(path)
        if run.is_finished():
            spent = run.model_card().privacy_spent_epsilon
            rows += [{"run": label, "site": site, "epsilon": eps} for site, eps in spent.items()]
    return pd.DataFrame(rows, columns=["run", "site", "epsilon"])


def kept_rounds_frame(runs: dict[str, Path]) -> pd.DataFrame:
    """Which round's model each finished federated run kept (``--keep-round``), and why, and the
    rounds whose mean it saved instead (``--average-rounds``)."""
    rows = []
    for label, path in runs.items():
        run = RunDirectory(path)
        if run.is_finished():
            card = run.model_card()
            rows.append(
                {
                    "run": label,
                    "kept round": card.kept_round,
                    "of": card.rounds_completed,
                    "rule": card.kept_rule,
                    "averaged rounds": ", ".join(map(str, card.averaged_rounds)) or "-",
                }
            )
    return pd.DataFrame(rows, columns=["run", "kept round", "of", "rule", "averaged rounds"])


def plot_curves(curves: pd.DataFrame, path: Path) -> bool:
    data = curves[curves["metric"].isin(["auroc", "auprc"])]
    if data.empty:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for ax, metric in zip(axes, ("auroc", "auprc"), strict=True):
        part = data[data["metric"] == metric]
        for (run, site), line in part.groupby(["run", "site"]):
            style = {"linewidth": 2.5, "color": "black"} if site == "weighted-mean" else {"linewidth": 1, "alpha": 0.8}
            label = f"{site}" if len(curves["run"].unique()) == 1 else f"{run}: {site}"
            ax.plot(line["round"], line["value"], marker="o", label=label, **style)
        ax.set_title(f"{metric.upper()} on each site's test stays, by round")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric.upper())
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def heatmap_matrix(results: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows: training (each local site, centralized, federated); columns: test site; mean over seeds."""
    part = results[(results["metric"] == metric) & results["protocol"].isin(["local", "centralized", "federated"])]
    if part.empty:
        return pd.DataFrame()
    part = part.assign(
        trained_on=np.where(part["protocol"] == "local", "local: " + part["train_sites"], part["protocol"])
    )
    matrix = part.pivot_table(index="trained_on", columns="test_site", values="value", aggfunc="mean")
    sites = sorted(c for c in matrix.columns if c != "pooled") + (["pooled"] if "pooled" in matrix.columns else [])
    order = sorted(i for i in matrix.index if i.startswith("local")) + [
        i for i in ("centralized", "federated") if i in matrix.index
    ]
    return matrix.loc[order, sites]


def plot_heatmap(matrix: pd.DataFrame, metric: str, path: Path) -> bool:
    if matrix.empty:
        return False
    fig, ax = plt.subplots(figsize=(1.2 * matrix.shape[1] + 3, 0.55 * matrix.shape[0] + 2))
    image = ax.imshow(matrix.values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(matrix.shape[1]), matrix.columns, rotation=30, ha="right")
    ax.set_yticks(range(matrix.shape[0]), matrix.index)
    for (i, j), value in np.ndenumerate(matrix.values):
        if np.isfinite(value):
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                color="white" if value < np.nanmean(matrix.values) else "black",
            )
    ax.set_xlabel("tested on")
    ax.set_ylabel("trained on")
    ax.set_title(f"{metric.upper()}: trained on (rows) x tested on (columns)")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_importance(importance: pd.DataFrame, path: Path, top: int = 20) -> bool:
    if importance.empty:
        return False
    part = importance.sort_values("importance").tail(top)
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(part) + 1.5))
    ax.barh(part["variable"], part["importance"], color="tab:blue")
    ax.set_xlabel("mean share of attention per stay")
    ax.set_title("Which variables the model attends to (test stays)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def summary_table(results: pd.DataFrame) -> pd.DataFrame:
    """Per protocol and test site: AUROC and AUPRC as 'value [low, high]' (first seed's interval, mean value)."""
    rows = []
    key = ["protocol", "train_sites", "test_site"]
    for (protocol, train_sites, test_site), group in results.groupby(key, sort=False):
        cells = {"protocol": protocol, "trained on": train_sites, "tested on": test_site}
        for metric in ("auroc", "auprc", "brier", "ece"):
            m = group[group["metric"] == metric]
            if m.empty:
                continue
            first = m.iloc[0]
            cells[metric.upper()] = f"{m['value'].mean():.3f} [{first['ci_low']:.3f}, {first['ci_high']:.3f}]"
        cells["n (pos)"] = f"{int(group['n'].iloc[0])} ({int(group['positives'].iloc[0])})"
        rows.append(cells)
    return pd.DataFrame(rows)


def markdown_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_none_\n"
    header = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns) + "\n"
    return header + "".join("| " + " | ".join(str(v) for v in row) + " |\n" for row in frame.itertuples(index=False))


def write_report(
    out: Path,
    title: str,
    setup: dict,
    results: pd.DataFrame,
    sites: pd.DataFrame,
    runs: dict[str, Path],
    importance: dict[str, float],
    warnings: list[str] | None = None,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "results.csv", results)
    write_csv(out / "sites.csv", sites)
    curves = curves_frame(runs)
    write_csv(out / "curves.csv", curves)
    privacy = privacy_frame(runs)
    write_csv(out / "privacy.csv", privacy)
    imp = pd.DataFrame({"variable": list(importance), "importance": list(importance.values())})
    write_csv(out / "importance.csv", imp.sort_values("importance", ascending=False))

    figures = {
        "curves.png": plot_curves(curves, out / "curves.png"),
        "heatmap_auroc.png": plot_heatmap(heatmap_matrix(results, "auroc"), "auroc", out / "heatmap_auroc.png"),
        "heatmap_auprc.png": plot_heatmap(heatmap_matrix(results, "auprc"), "auprc", out / "heatmap_auprc.png"),
        "importance.png": plot_importance(imp, out / "importance.png"),
    }
    lines = [f"# {title}", ""]
    if warnings:
        lines += [
            "## Warnings: splits without both classes",
            "",
            "These val or test splits hold patients of one class only: their AUROC and AUPRC are undefined "
            "(NaN), early stopping on them is blind, and the rows of such a test split carry this in "
            "results.csv (`warning`).",
            "",
            *(f"- **warning**: {w}" for w in warnings),
            "",
        ]
    lines += ["## Setup", ""]
    lines += [f"- **{k}**: {v}" for k, v in setup.items()]
    lines += ["", "## Virtual hospitals", "", markdown_table(sites.round(3))]
    lines += [
        "## Discrimination and calibration",
        "",
        "Each cell: value [95 % bootstrap interval over test stays]. AUROC and AUPRC: higher is better; "
        "Brier score and expected calibration error (ECE): lower is better. 'pooled' is all sites' test stays together.",
        "",
        markdown_table(summary_table(results)),
    ]
    if figures["heatmap_auroc.png"]:
        lines += [
            "## Cross-site generalisation",
            "",
            "A model trained at one hospital (rows) and tested at another (columns); "
            "the diagonal is each hospital's own model on its own patients.",
            "",
            "![AUROC heat map](heatmap_auroc.png)",
            "",
            "![AUPRC heat map](heatmap_auprc.png)",
            "",
        ]
    if figures["curves.png"]:
        lines += ["## Federated training, round by round", "", "![Round-by-round curves](curves.png)", ""]
        lines += ["The model each run ended with:", "", markdown_table(kept_rounds_frame(runs))]
    if not privacy.empty:
        lines += ["## Privacy spent (differential privacy, per site)", "", markdown_table(privacy), ""]
    if figures["importance.png"]:
        lines += [
            "## What the model looks at",
            "",
            "Mean share of the attention-pooling weight (through the last attention layer) that each variable's "
            "measurements receive, over all test stays. It shows what the model uses, not what causes the outcome.",
            "",
            "![Variable importance](importance.png)",
            "",
        ]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report
