"""`tandem compare`: a prediction (`tandem sim run --json`) against a measurement (`tandem bench cluster --json`):
relative error per metric key, and overlaid CDFs of TTFT, mean TBT and E2E from the `samples` key."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from services.contracts.errors import InvalidArgument

# The keys compared, in table order (both JSONs carry them: services.contracts.metrics.summarize_arrays).
KEYS = ["ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "tbt_p50_s", "tbt_p90_s", "tbt_p99_s", "tbt_mean_p50_s",
        "tbt_mean_p99_s", "e2e_p50_s", "e2e_p90_s", "e2e_p99_s", "throughput_rps", "tokens_per_s", "completed"]
HEADLINE = ["ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "e2e_p50_s", "e2e_p99_s"]


def load_result(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise InvalidArgument(f"result file not found: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{p}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidArgument(f"{p}: expected a JSON object of metric keys")
    return data


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    """(predicted - measured) / measured; None when either is missing or the measurement is 0."""
    if predicted is None or measured is None:
        return None
    p, m = float(predicted), float(measured)
    if not (math.isfinite(p) and math.isfinite(m)) or m == 0:
        return None
    return (p - m) / abs(m)


def compare(predicted: dict[str, Any], measured: dict[str, Any], keys: list[str] | None = None) -> dict[str, Any]:
    """{"predicted": {k: v}, "measured": {k: v}, "relative_error": {k: e}} over the keys both carry."""
    keys = [k for k in (keys or KEYS) if k in predicted and k in measured]
    if not keys:
        raise InvalidArgument("the two results share none of the metric keys (ttft_p50_s, ...)")
    return {"predicted": {k: predicted[k] for k in keys}, "measured": {k: measured[k] for k in keys},
            "relative_error": {k: relative_error(predicted[k], measured[k]) for k in keys}}


def table(cmp: dict[str, Any], title: str = "predicted vs measured") -> Any:
    from rich.table import Table

    t = Table(title=title)
    for col, just in (("metric", "left"), ("predicted", "right"), ("measured", "right"), ("rel. error", "right")):
        t.add_column(col, justify=just)
    for k, e in cmp["relative_error"].items():
        fmt = (lambda v: f"{v:.0f}") if k == "completed" else (lambda v: "-" if v is None else f"{v:.4g}")
        err = "-" if e is None else f"{e:+.1%}"
        t.add_row(k, fmt(cmp["predicted"][k]), fmt(cmp["measured"][k]), err)
    return t


def plot_cdfs(predicted: dict[str, Any], measured: dict[str, Any], path: str | Path, title: str = "") -> bool:
    """Overlaid CDFs (predicted dashed, measured solid) of the per-request samples; False if either lacks them."""
    ps, ms = predicted.get("samples"), measured.get("samples")
    if not ps or not ms:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, label) in zip(axes, (("ttft_s", "TTFT (s)"), ("tbt_mean_s", "mean TBT per request (s)"),
                                       ("e2e_s", "E2E (s)")), strict=True):
        for data, style, name in ((ms, "-", "measured"), (ps, "--", "predicted")):
            v = np.sort(np.asarray(data.get(key) or [], dtype=float))
            if v.size:
                ax.step(v, np.arange(1, v.size + 1) / v.size, style, where="post", label=f"{name} (n={v.size})")
        ax.set_xlabel(label)
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
