"""Render a quality bench result (the JSON `wina bench --json` prints) as a Markdown table: one row per
transform x criterion x allocation, one column per target, each cell `ppl (realized sparsity)`."""
from __future__ import annotations


def markdown(result: dict) -> str:
    runs = result["runs"]
    targets = sorted({r["target_sparsity"] for r in runs if r["criterion"] != "dense"})
    lines = ["| transform | criterion | allocation | dense | " + " | ".join(f"{t:g}" for t in targets) + " |",
             "|---|---|---|---|" + "---|" * len(targets)]
    dense = {r["artifact"]: r["ppl"] for r in runs if r["criterion"] == "dense"}
    keys = []
    for r in runs:
        k = (r["artifact"], r["transform"], r["criterion"], r["allocation"])
        if r["criterion"] != "dense" and k not in keys:
            keys.append(k)
    for art, transform, crit, alloc in keys:
        cells = []
        for t in targets:
            hit = [r for r in runs if (r["artifact"], r["transform"], r["criterion"], r["allocation"]) ==
                   (art, transform, crit, alloc) and r["target_sparsity"] == t]
            cells.append(f"{hit[0]['ppl']:.2f} ({hit[0]['realized_sparsity']:.3f})" if hit else "-")
        lines.append(f"| {transform} | {crit} | {alloc} | {dense[art]:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
