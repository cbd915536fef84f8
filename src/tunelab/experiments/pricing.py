"""What each cell cost, from its measured time and a price per device-hour (``report.price_per_hour``).

The price is in any currency (the report says "units") per device-hour. It is a report setting, not
part of a cell's identity (``report`` is in ``spec.COSMETIC_FIELDS``): changing it reruns no cell, and
``tunelab report RUN_DIR --price-per-hour X`` rebuilds the report at another price from the same
result files. Without a price the report has no cost column, frontier or plot.

Formulas, from fields every result file records (``runner.run_cell``):

- **training cost** = ``train_seconds / 3600 × processes × price``: the wall time of every stage's
  training (not evaluation) in device-hours. ``processes`` is ``device.processes`` (the data-parallel
  launch's world size; 1 for results recorded before the field existed); on a CPU, one process counts
  as one device, so price it as the share of the machine that process had.
- **inference cost per 1M tokens** = ``price × (inference_latency_ms / 3.6e6) / inference_latency_tokens
  × 1e6``: one forward pass (prefill, no generation) over the timed batch of test prompts, per
  non-padding prompt token, on one device. Generation is not timed on its own, so no per-generated-token
  cost is claimed; results without ``inference_latency_tokens`` (older ones, or ``eval.latency_batches:
  0``) show "–".
- **device**: what the time was measured on (``device`` in the result: CPU model, cores the process
  could use and torch threads, or the GPU's name and the number of processes), printed next to the cost
  so that a CPU cost is never read as a GPU cost. Older results without it say so (a ``+cpu`` torch
  build is named).

Rows (``report.summarize(results, price)``) get ``train_cost`` (mean over seeds) with its 95% CI,
``inference_cost_per_mtok``, ``device`` and ``price_per_hour``; the analysis adds ``train_cost`` to the
costs it draws Pareto frontiers against.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import yaml

from tunelab.errors import ConfigError
from tunelab.experiments import rundir
from tunelab.experiments.plots import ci95
from tunelab.utils import atomic_write_text

COST_KEY = "train_cost"
PLOT_NAME = "pareto_cost"


def check_price(value, where: str) -> float | None:
    """A price per device-hour: a finite number >= 0, or None (no cost). One-line ConfigError otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}: the price per device-hour must be a number >= 0 (got {value!r})")
    return float(value)


def price_per_hour(run_dir: str | Path, override: float | None = None) -> float | None:
    """``override`` when given, else ``report.price_per_hour`` of the run's ``config.yaml`` (None: no cost)."""
    if override is not None:
        return check_price(override, "--price-per-hour")
    raw = rundir.read_config(run_dir)  # None: no (readable) config.yaml, the results alone, no price
    section = raw.get("report") if raw is not None else None
    value = section.get("price_per_hour") if isinstance(section, dict) else None
    return check_price(value, f"{Path(run_dir) / 'config.yaml'}: report.price_per_hour")


def sync_config(run_dir: Path, report_section: dict) -> None:
    """Write the spec's ``report`` section into ``config.yaml`` when only it changed (no cell reruns for it),
    so that a later ``tunelab report`` prices the run as the last ``tunelab run`` did."""
    raw = rundir.read_config(run_dir)
    if raw is None:
        return

    def set_values(section) -> dict:  # a missing section or key is the default: None
        return {k: v for k, v in section.items() if v is not None} if isinstance(section, dict) else {}

    if set_values(raw.get("report")) != set_values(report_section):
        raw["report"] = report_section
        atomic_write_text(Path(run_dir) / "config.yaml", yaml.safe_dump(raw, sort_keys=False))


def processes(record: dict) -> int:
    device = record.get("device")
    count = device.get("processes") if isinstance(device, dict) else None
    return count if isinstance(count, int) and count > 0 else 1


def training_cost(record: dict, price: float) -> float:
    """``train_seconds / 3600 × processes × price``."""
    return record["train_seconds"] / 3600.0 * processes(record) * price


def inference_cost_per_million(record: dict, price: float) -> float | None:
    """``price × latency hours / non-padding tokens of the timed batch × 1e6``; None when not recorded."""
    latency, tokens = record.get("inference_latency_ms"), record.get("inference_latency_tokens")
    if not isinstance(latency, (int, float)) or not isinstance(tokens, int) or tokens <= 0:
        return None
    return price * (latency / 3.6e6) / tokens * 1e6


def device_text(record: dict) -> str:
    """What the time was measured on, in words (``not recorded`` for results without a ``device`` field)."""
    device = record.get("device")
    if not isinstance(device, dict):
        torch_version = str((record.get("versions") or {}).get("torch", ""))
        return "CPU (torch +cpu build; cores not recorded)" if torch_version.endswith("+cpu") else "not recorded"
    count = processes(record)
    name = device.get("name") or ""
    if device.get("type") == "cpu":
        threads = device.get("torch_threads")
        text = (f"CPU {name}".strip() + f", {device.get('cpu_count', '?')} cores"
                + (f", {threads} torch threads" if threads else ""))
        return text + (f", {count} processes" if count > 1 else "")
    return f"{str(device.get('type', '?')).upper()} {name}".strip() + f" ×{count}"


def row_fields(group: list[dict], price: float | None) -> dict:
    """The cost fields of one report row (cells of one method and size over seeds); {} without a price."""
    if price is None:
        return {}
    costs = [training_cost(r, price) for r in group]
    inference = [c for c in (inference_cost_per_million(r, price) for r in group) if c is not None]
    return {COST_KEY: statistics.fmean(costs), f"{COST_KEY}_ci95": ci95(costs),
            "inference_cost_per_mtok": statistics.fmean(inference) if inference else None,
            "device": " / ".join(dict.fromkeys(device_text(r) for r in group)), "price_per_hour": price}


def money(value: float) -> str:
    return f"{value:.4g}"


def priced(rows: list[dict]) -> bool:
    return any(COST_KEY in row for row in rows)


def cost_label(rows: list[dict]) -> str:
    price = next(r["price_per_hour"] for r in rows if COST_KEY in r)
    return f"training cost (units at {price:g} per device-hour)"


def frontier_costs(rows: list[dict]) -> tuple[tuple[str, str, str], ...]:
    """``(key, label, format)`` of the training cost for the analysis' frontiers; () without a price."""
    return ((COST_KEY, cost_label(rows), "{:.4g}"),) if priced(rows) else ()


def columns(rows: list[dict]) -> list[tuple[str, object]]:
    """Extra results-table columns ``(header, row -> text)``: training cost, inference cost, device (the
    last, text, column is the one to left-align)."""
    if not priced(rows):
        return []

    def train(row: dict) -> str:
        ci = row.get(f"{COST_KEY}_ci95") or 0.0
        return money(row[COST_KEY]) + (f" ± {ci:.2g}" if row["seeds"] > 1 else "")

    def inference(row: dict) -> str:
        value = row.get("inference_cost_per_mtok")
        return "–" if value is None else money(value)

    return [("train cost", train), ("inference cost / 1M tokens", inference),
            ("device (cost measured on)", lambda row: row.get("device") or "not recorded")]


def note(rows: list[dict]) -> str:
    """The sentence under the results table that says how the costs were computed (empty without a price)."""
    if not priced(rows):
        return ""
    price = next(r["price_per_hour"] for r in rows if COST_KEY in r)
    return (f"Cost at {price:g} units per device-hour (report.price_per_hour, or tunelab report "
            "--price-per-hour): train cost = train s / 3600 × training processes × price (mean ± 95% CI over "
            "seeds); inference cost / 1M tokens = price × one timed forward pass (prefill of a batch of test "
            "prompts, no generation) per non-padding prompt token × 1e6. Costs are only comparable between cells "
            "measured on the same device (last column): a CPU cost is not a GPU cost.")
