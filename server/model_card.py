"""Final outputs of a federated run: the model, its card, and every metric as a tidy table.

The card says what a reader of the model needs to trust it: how it was trained (strategy,
rounds, settings), on what (per-site provenance as counts, never patient data), how well it
did at each site, which replies were rejected, and how much privacy each site spent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd

from hymate.files import atomic_write_text, to_jsonable, write_csv, write_json
from hymate.model_bundle import ModelBundle
from server.run_dir import RunDirectory
from server.settings import ServerSettings

if TYPE_CHECKING:
    from server.federation import FederationFacts


def metrics_table(history: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for entry in history:
        for phase in ("train", "evaluate"):
            for site, metrics in entry["sites"][phase].items():
                rows += [
                    {"round": entry["round"], "phase": phase, "site": site, "metric": k, "value": v}
                    for k, v in metrics.items()
                ]
            rows += [
                {"round": entry["round"], "phase": phase, "site": "weighted-mean", "metric": k, "value": v}
                for k, v in entry[phase].items()
            ]
    return pd.DataFrame(rows, columns=["round", "phase", "site", "metric", "value"])


def privacy_spent(history: list[dict[str, Any]]) -> dict[str, float]:
    """The latest epsilon each DP site reported (sites report their cumulative spend)."""
    spent: dict[str, float] = {}
    for entry in history:
        for site, report in entry.get("privacy", {}).items():
            if "dp-epsilon" in report:
                spent[site] = report["dp-epsilon"]
    return spent


def write_final_outputs(
    run_dir: RunDirectory, settings: ServerSettings, facts: FederationFacts, bundle: ModelBundle
) -> dict[str, Any]:
    history = run_dir.history()
    last = history[-1] if history else {"sites": {"evaluate": {}}, "evaluate": {}}
    card = {
        "model": "HyMaTE (hybrid Mamba + Transformer) for binary outcomes from ICU stays",
        "task": {"dataset": facts.dataset, "variables": facts.variables, "static_features": facts.static_names},
        "training": {
            "strategy": settings.strategy.name,
            "strategy_options": dict(settings.strategy.options),
            "rounds_completed": len(history),
            "rounds_planned": settings.rounds,
            "local_epochs": settings.local_epochs,
            "min_clients": settings.min_clients,
            "model": settings.model,
        },
        "data_provenance": facts.sites,
        "final_evaluation": {"weighted_mean": last["evaluate"], "per_site": last["sites"]["evaluate"]},
        "privacy_spent_epsilon": privacy_spent(history),
        "rejected_replies": [r for entry in history for r in entry["rejected"]],
    }
    bundle.save(run_dir.path / "model.pt")
    write_json(run_dir.path / "model_card.json", card)
    atomic_write_text(run_dir.path / "model_card.md", render_markdown(card))
    write_csv(run_dir.path / "metrics.csv", metrics_table(history))
    return card


def render_markdown(card: dict[str, Any]) -> str:
    card = to_jsonable(card)
    t = card["training"]
    lines = [
        "# Model card: HyMaTE, federated",
        "",
        f"Task: binary outcome on **{card['task']['dataset']}** stays, "
        f"{len(card['task']['variables'])} time-series variables, {len(card['task']['static_features'])} static features.",
        "",
        f"Training: strategy `{t['strategy']}` {t['strategy_options'] or ''}, {t['rounds_completed']} of {t['rounds_planned']} rounds, "
        f"{t['local_epochs']} local epoch(s) per round, at least {t['min_clients']} sites per round.",
        "",
        "## Sites (aggregate provenance, no patient data)",
        "",
        "| site | dataset | train stays | test stays | prevalence | epsilon spent |",
        "|---|---|---|---|---|---|",
    ]
    for site, p in sorted(card["data_provenance"].items()):
        eps = card["privacy_spent_epsilon"].get(site, "no DP")
        lines.append(
            f"| {site} | {p.get('dataset')} | {p.get('stays_train')} | {p.get('stays_test')} | {p.get('prevalence')} | {eps} |"
        )
    lines += [
        "",
        "## Final evaluation (each site's own test stays)",
        "",
        "| site | n | AUROC | AUPRC | loss |",
        "|---|---|---|---|---|",
    ]
    for site, m in sorted(card["final_evaluation"]["per_site"].items()):
        lines.append(
            f"| {site} | {m.get('num-examples')} | {_fmt(m.get('auroc'))} | {_fmt(m.get('auprc'))} | {_fmt(m.get('loss'))} |"
        )
    mean = card["final_evaluation"]["weighted_mean"]
    lines.append(
        f"| weighted mean | | {_fmt(mean.get('auroc'))} | {_fmt(mean.get('auprc'))} | {_fmt(mean.get('loss'))} |"
    )
    if card["rejected_replies"]:
        lines += ["", "## Rejected replies", ""]
        lines += [f"- {r['site']} ({r['phase']}): {r['reason']}" for r in card["rejected_replies"]]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("n/a" if value is None else str(value))
