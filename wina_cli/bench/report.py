"""Render a quality bench result (the JSON `wina bench --json` prints) as a Markdown table: one row per
transform x criterion x allocation (x policy), one column per target (per realized sparsity with `--realized`),
each cell `ppl (realized sparsity)`, and, when the bench searched them, one column per perplexity budget with
`realized sparsity (target)`, searched under the row's policy (and, for distilled artifacts, one more per budget
counted from the tuned model's own dense perplexity)."""
from __future__ import annotations

TUNED_DENSE = "tuned dense"  # a budget's reference: a distilled artifact's own weights computed dense


def markdown(result: dict) -> str:
    runs = result["runs"]
    policies = result.get("policies", ["all"])
    show_policy = policies != ["all"]
    # a distilled artifact's dense reference is its source checkpoint; its own (tuned) dense model follows
    dense = {(r["artifact"], r["policy"]): f"{r['ppl']:.2f}" + (f" (tuned {r['tuned_dense_ppl']:.2f})"
                                                               if "tuned_dense_ppl" in r else "")
             for r in runs if r["criterion"] == "dense"}
    rows: dict[tuple, dict[float, dict]] = {}  # insertion order = the order the bench ran them
    for r in runs:
        if r["criterion"] != "dense":
            key = (r["artifact"], r["transform"], r["criterion"], r["allocation"], r["policy"])
            # With --realized the columns are the realized sparsities asked for, each cell at its own target.
            rows.setdefault(key, {})[r.get("requested_realized", r["target_sparsity"])] = r
    budgets = sorted({b["max_ppl_increase"] for b in result.get("budgets", [])})
    # a distilled artifact's budgets are searched from its source checkpoint and from its own dense model; an
    # artifact that was not tuned has one dense model, which is both
    def key(b: dict) -> tuple:
        return b["artifact"], b["criterion"], b["allocation"], b.get("policy", "all"), b["max_ppl_increase"]

    def cell(f: dict | None) -> str:
        return "-" if f is None else f"{f['realized_sparsity']:.3f} ({f['target_sparsity']:.3f})"

    own = {key(b): b for b in result.get("budgets", []) if b.get("reference") == TUNED_DENSE}
    found = {key(b): b for b in result.get("budgets", []) if b.get("reference") != TUNED_DENSE}
    targets = sorted({t for cells in rows.values() for t in cells})
    head = ["transform", "criterion", "allocation"] + (["policy"] if show_policy else []) + ["dense"]
    head += [f"{t:g}" for t in targets] + [f"PPL-{b * 100:g}%" for b in budgets]
    head += [f"PPL-{b * 100:g}% from tuned dense" for b in budgets] if own else []
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (art, transform, crit, alloc, pol), cells in rows.items():
        text = [transform, crit, alloc] + ([pol] if show_policy else []) + [dense[(art, pol)]]
        text += [f"{cells[t]['ppl']:.2f} ({cells[t]['realized_sparsity']:.3f})" if t in cells else "-"
                 for t in targets]
        text += [cell(found.get((art, crit, alloc, pol, b))) for b in budgets]
        text += [cell(own.get((art, crit, alloc, pol, b), found.get((art, crit, alloc, pol, b))))
                 for b in (budgets if own else [])]
        lines.append("| " + " | ".join(text) + " |")
    return "\n".join(lines) + "\n"
