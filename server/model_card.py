"""Final outputs of a federated run: the model, its card, and every metric as a tidy table.

The card says what a reader of the model needs to trust it: which run and software made it
(run id, date, versions, the SHA-256 of model.pt), how it was trained (strategy, rounds,
settings), for what label, on what (per-site provenance as counts, never patient data; exactly
the sites whose moments shaped the normaliser, which of them trained in which round, and how
their identities were established), how well it did at each site (with 95 % intervals), which
replies were rejected, which nodes were refused, and how much privacy each site spent.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from hymate.files import to_jsonable
from server.federation_facts import FederationFacts
from server.label_definitions import label_definition
from server.metric_intervals import site_intervals
from server.round_selection import KeptRound
from server.settings import ServerSettings

SOFTWARE = ("hymate-fl", "flwr", "torch", "opacus")
METRICS_COLUMNS = ["round", "phase", "site", "metric", "value"]
TRAIN, EVALUATE = "train", "evaluate"


@dataclass(frozen=True)
class ModelCardSummary:
    """What a reader of many runs (the simulation's report) needs from one card, typed."""

    rounds_completed: int
    #: The round whose model the run saved, and the rule that chose it (``keep-round``).
    kept_round: int
    kept_rule: str
    #: The rounds whose models the saved one is the mean of (``average-rounds``); empty: the kept round's.
    averaged_rounds: tuple[int, ...]
    #: The latest epsilon each DP site reported; sites without DP are absent.
    privacy_spent_epsilon: dict[str, float]
    #: The saved model's evaluation at each site: metric name -> value (NaN where undefined).
    final_per_site: dict[str, dict[str, float]]
    #: The saved model's evaluation, weighted by each site's test stays.
    final_weighted_mean: dict[str, float]

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> ModelCardSummary:
        final, training = card["final_evaluation"], card["training"]
        # A card from before keep-round existed holds the last round's model.
        kept = training.get("kept_round") or {"round": training["rounds_completed"], "rule": "last"}
        return cls(
            rounds_completed=int(training["rounds_completed"]),
            kept_round=int(kept["round"]),
            kept_rule=str(kept["rule"]),
            averaged_rounds=tuple(int(r) for r in kept.get("averaged_rounds", [])),
            privacy_spent_epsilon={site: float(eps) for site, eps in card["privacy_spent_epsilon"].items()},
            final_per_site={site: _floats(metrics) for site, metrics in final["per_site"].items()},
            final_weighted_mean=_floats(final["weighted_mean"]),
        )


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    """JSON has no NaN: the card stores an undefined metric as null; read it back as NaN."""
    return {k: math.nan if v is None else float(v) for k, v in metrics.items()}


def metrics_table(history: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for entry in history:
        for phase in (TRAIN, EVALUATE):
            for site, metrics in entry["sites"][phase].items():
                rows += [
                    {"round": entry["round"], "phase": phase, "site": site, "metric": k, "value": v}
                    for k, v in metrics.items()
                ]
            rows += [
                {"round": entry["round"], "phase": phase, "site": "weighted-mean", "metric": k, "value": v}
                for k, v in entry[phase].items()
            ]
    return pd.DataFrame(rows, columns=METRICS_COLUMNS)


def evaluation_curves(table: pd.DataFrame) -> pd.DataFrame:
    """The evaluation rows of a ``metrics_table``, without the phase column."""
    return table[table["phase"] == EVALUATE].drop(columns="phase").reset_index(drop=True)


def privacy_spent(history: list[dict[str, Any]]) -> dict[str, float]:
    """The latest epsilon each DP site reported (sites report their cumulative spend)."""
    spent: dict[str, float] = {}
    for entry in history:
        for site, report in entry.get("privacy", {}).items():
            if "dp-epsilon" in report:
                spent[site] = report["dp-epsilon"]
    return spent


def software_versions() -> dict[str, str]:
    versions = {}
    for package in SOFTWARE:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def rounds_by_site(history: list[dict[str, Any]]) -> dict[str, list[int]]:
    """The rounds each site's update went into the model."""
    rounds: dict[str, list[int]] = {}
    for entry in history:
        for site in entry["sites"]["train"]:
            rounds.setdefault(site, []).append(entry["round"])
    return dict(sorted(rounds.items()))


def refused_nodes(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every node refused for the run (each round records those refused so far), once each."""
    seen: dict[tuple, dict[str, Any]] = {}
    for entry in history:
        for r in entry.get("refused", []):
            seen.setdefault((r["node_id"], r["site"], r["reason"]), r)
    return list(seen.values())


def identity_summary(facts: FederationFacts) -> dict[str, Any]:
    authenticated = bool(facts.identities) and all(k == "registered key" for k in facts.identities.values())
    return {
        "authenticated": authenticated,
        "sites": facts.identities,
        "note": (
            "each site is named by the name its SuperNode key is registered under"
            if authenticated
            else "site names are self-reported (simulation or --insecure): not authenticated"
        ),
    }


def model_card(
    history: list[dict[str, Any]],
    settings: ServerSettings,
    facts: FederationFacts,
    model_path: Path,
    kept: KeptRound,
    run_id: int = 0,
    averaged_evaluation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The card of the run whose rounds are ``history`` and whose saved model, ``model_path``, is
    round ``kept``'s, or the mean of ``kept.averaged_rounds``' models, which the sites evaluated
    in ``averaged_evaluation`` (its ``evaluate``, ``sites`` and ``rejected``, as a round's)."""
    final = averaged_evaluation or next(entry for entry in history if entry["round"] == kept.round)
    secure = settings.secure_aggregation
    return {
        "model": "HyMaTE (hybrid Mamba + Transformer) for binary outcomes from ICU stays",
        "run": {
            "id": run_id,
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "software": software_versions(),
            "model_sha256": sha256_of(model_path),
        },
        "task": {
            "dataset": facts.dataset,
            "label": label_definition(facts.dataset),
            "variables": facts.variables,
            "static_features": facts.static_names,
        },
        "training": {
            "strategy": settings.strategy.name,
            "strategy_options": dict(settings.strategy.options),
            "rounds_completed": len(history),
            "rounds_planned": settings.rounds,
            "kept_round": kept.as_record(),
            "local_epochs": settings.local_epochs,
            "batch_size": settings.batch_size,
            "learning_rate": settings.learning_rate,
            "lr_schedule": settings.lr_schedule,
            "optimizer": settings.optimizer,
            "momentum": settings.momentum if settings.optimizer == "sgd" else None,
            "keep_optimizer_state": settings.keep_optimizer_state,
            "weight_decay": settings.weight_decay,
            "clip_grad_norm": settings.clip_grad_norm,
            # The positive class's loss weight every site used (0: each site its own).
            "positive_class_weight": settings.plan_pos_weight(facts.positive_class_weight()),
            # Taken out of the saved model's risks, so that they are probabilities (None: not known, kept).
            "class_weight_removed_from_risks": settings.trained_class_weight(facts),
            "max_events": settings.max_events,
            "seed": settings.seed,
            "local_norms": settings.local_norms,
            "min_clients": settings.min_clients,
            "model": settings.model,
            # With secure aggregation the coordinator saw only sums of updates and normalisation sums.
            "secure_aggregation": secure.as_record() if secure.enabled else None,
            "init_from": initialisation_record(settings.initialisation.init_from),
            "freeze": settings.freeze,
        },
        "failed_rounds": [
            {"round": entry["round"], "reason": entry["failed"]} for entry in history if "failed" in entry
        ],
        "identity": identity_summary(facts),
        "normaliser_sites": sorted(facts.sites),
        "rounds_by_site": rounds_by_site(history),
        "data_provenance": facts.sites,
        "final_evaluation": {
            "round": kept.round,
            "averaged_rounds": list(kept.averaged_rounds),
            "weighted_mean": final[EVALUATE],
            "per_site": final["sites"][EVALUATE],
            "per_site_95ci": {site: site_intervals(m) for site, m in sorted(final["sites"][EVALUATE].items())},
        },
        "privacy_spent_epsilon": privacy_spent(history),
        "rejected_replies": facts.query_rejections
        + [r for entry in history for r in entry["rejected"]]
        + (averaged_evaluation or {}).get("rejected", []),
        "refused_nodes": refused_nodes(history),
    }


def _averaged_text(kept: dict[str, Any]) -> str:
    rounds = kept.get("averaged_rounds") or []
    return f", the mean of the models of rounds {', '.join(map(str, rounds))}" if rounds else ""


def _final_model_text(final: dict[str, Any]) -> str:
    rounds = final.get("averaged_rounds") or []
    if rounds:
        return f"the model saved: the mean of rounds {', '.join(map(str, rounds))}"
    return f"the kept round {final['round']}"


def initialisation_record(init_from: str) -> dict[str, str] | None:
    """Which checkpoint the run started from (its path and SHA-256), or None for random weights."""
    return {"path": init_from, "sha256": sha256_of(Path(init_from))} if init_from else None


def _risk_line(removed: float | None) -> str:
    if removed == 1.0:
        return "Risks: probabilities (the loss was unweighted)."
    if removed is None:
        return "Risks: the sites' own loss weights are not all known, so the model's risks keep their offset (odds too high)."
    return (
        f"Risks: probabilities; the positive class's loss weight ({removed:.3g}) was taken out of the head's bias, "
        "which changes no ranking."
    )


def render_markdown(card: dict[str, Any], model_file: str) -> str:
    """The card for people; ``model_file``: the name of the model file whose SHA-256 it states."""
    card = to_jsonable(card)
    t = card["training"]
    run, identity = card["run"], card["identity"]
    software = ", ".join(f"{k} {v}" for k, v in run["software"].items())
    lines = [
        "# Model card: HyMaTE, federated",
        "",
        f"Run {run['id']}, {run['date']}; {software}.",
        f"`{model_file}` SHA-256: `{run['model_sha256']}`",
        "",
        f"Task: binary outcome on **{card['task']['dataset']}** stays, "
        f"{len(card['task']['variables'])} time-series variables, {len(card['task']['static_features'])} static features.",
        f"Label: {card['task']['label']}.",
        "",
        f"Training: strategy `{t['strategy']}` {t['strategy_options'] or ''}, {t['rounds_completed']} of {t['rounds_planned']} rounds, "
        f"{t['local_epochs']} local epoch(s) per round, batch size {t['batch_size']}, learning rate {t['learning_rate']} ({t['lr_schedule']}), "
        f"{_optimizer_text(t)}, "
        f"seed {t['seed']}, at least {t['min_clients']} sites per round.",
        f"Kept: round {t['kept_round']['round']} ({t['kept_round']['rule']}){_averaged_text(t['kept_round'])}.",
        f"Model: {', '.join(f'{k} {v}' for k, v in t['model'].items())}.",
        _risk_line(t.get("class_weight_removed_from_risks")),
        _secure_aggregation_line(t["secure_aggregation"]),
        (
            f"Initial weights: `{t['init_from']['path']}` (SHA-256 `{t['init_from']['sha256']}`), frozen: {t['freeze']}."
            if t.get("init_from")
            else "Initial weights: random."
        ),
        "",
        "## Sites (aggregate provenance, no patient data)",
        "",
        f"Identities: {identity['note']}. The normaliser was built from exactly these sites' moments.",
        "",
        "| site | identity | dataset | train stays | test stays | prevalence | trained in rounds | epsilon spent |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for site, p in sorted(card["data_provenance"].items()):
        eps = card["privacy_spent_epsilon"].get(site, "no DP")
        rounds = ", ".join(map(str, card["rounds_by_site"].get(site, []))) or "none"
        lines.append(
            f"| {site} | {identity['sites'].get(site, 'unknown')} | {p.get('dataset')} | {p.get('stays_train')} | "
            f"{p.get('stays_test')} | {p.get('prevalence')} | {rounds} | {eps} |"
        )
    lines += [
        "",
        f"## Final evaluation ({_final_model_text(card['final_evaluation'])}, each site's own test stays, 95 % intervals)",
        "",
        "| site | n | AUROC | AUPRC | loss |",
        "|---|---|---|---|---|",
    ]
    intervals = card["final_evaluation"]["per_site_95ci"]
    for site, m in sorted(card["final_evaluation"]["per_site"].items()):
        ci = intervals.get(site, {})
        lines.append(
            f"| {site} | {m.get('num-examples')} | {_fmt(m.get('auroc'))} {_ci(ci.get('auroc'))} | "
            f"{_fmt(m.get('auprc'))} {_ci(ci.get('auprc'))} | {_fmt(m.get('loss'))} |"
        )
    mean = card["final_evaluation"]["weighted_mean"]
    lines.append(
        f"| weighted mean | | {_fmt(mean.get('auroc'))} | {_fmt(mean.get('auprc'))} | {_fmt(mean.get('loss'))} |"
    )
    if card["failed_rounds"]:
        lines += ["", "## Failed rounds (the model was kept as it was)", ""]
        lines += [f"- round {r['round']}: {r['reason']}" for r in card["failed_rounds"]]
    if card["rejected_replies"]:
        lines += ["", "## Rejected replies", ""]
        lines += [f"- {r['site']} ({r['phase']}): {r['reason']}" for r in card["rejected_replies"]]
    if card["refused_nodes"]:
        lines += ["", "## Nodes refused for this run", ""]
        lines += [f"- {r['site']} (node {r['node_id']}): {r['reason']}" for r in card["refused_nodes"]]
    return "\n".join(lines) + "\n"


def _optimizer_text(training: dict) -> str:
    """The sites' optimiser as the card's markdown states it (cards written before it was recorded: AdamW)."""
    name = training.get("optimizer", "adamw")
    text = f"SGD with momentum {training['momentum']}" if name == "sgd" else "AdamW"
    return text + (", its state kept between rounds" if training.get("keep_optimizer_state") else "")


def _secure_aggregation_line(secure: dict[str, Any] | None) -> str:
    if not secure:
        return "Secure aggregation: off (the coordinator saw each site's update and normalisation sums)."
    return (
        "Secure aggregation: on (Flower's SecAgg+; the coordinator saw only sums of the sites' updates and "
        f"normalisation sums): {', '.join(f'{k} {v}' for k, v in secure.items())}."
    )


def _ci(interval: Any) -> str:
    if isinstance(interval, list):
        return f"({interval[0]:.3f}-{interval[1]:.3f})"
    return f"({interval})" if interval else ""


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("n/a" if value is None else str(value))
