"""Render a quality bench result (the JSON `wina bench --json` prints) as a Markdown table: one row per
transform x criterion x allocation, one column per target, each cell `ppl (realized sparsity)`."""
from __future__ import annotations


def markdown(result: dict) -> str:
    runs = result["runs"]
    dense = {r["artifact"]: r["ppl"] for r in runs if r["criterion"] == "dense"}
    rows: dict[tuple, dict[float, dict]] = {}  # insertion order = the order the bench ran them
    for r in runs:
        if r["criterion"] != "dense":
            key = (r["artifact"], r["transform"], r["criterion"], r["allocation"])
            rows.setdefault(key, {})[r["target_sparsity"]] = r
    targets = sorted({t for cells in rows.values() for t in cells})
    lines = ["| transform | criterion | allocation | dense | " + " | ".join(f"{t:g}" for t in targets) + " |",
             "|---|---|---|---|" + "---|" * len(targets)]
    for (art, transform, crit, alloc), cells in rows.items():
        text = [f"{cells[t]['ppl']:.2f} ({cells[t]['realized_sparsity']:.3f})" if t in cells else "-" for t in targets]
        lines.append(f"| {transform} | {crit} | {alloc} | {dense[art]:.2f} | " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"
