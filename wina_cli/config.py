"""The recipe: a strict schema for YAML configs, CLI overrides on top, and the resolved form saved beside an
artifact (recipe.yaml) so `wina calibrate --config recipe.yaml` rebuilds it.

Unknown keys and wrong types are errors that name their path in the YAML (e.g. `sparsity.target`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from .errors import ConfigError


@dataclass
class DataSection:
    path: str = ""
    num_samples: int = 64
    seq_len: int = 512


@dataclass
class SparsitySection:
    target: float = 0.5
    criterion: str = "wina"  # wina | teal
    # greedy (within each block) | global (across layers, then blocks) | kl (every projection by its own measured
    # effect on the output distribution) | uniform
    allocation: str = "greedy"
    mode: str = "threshold"  # threshold | topk
    # > 0: search the highest target whose calibration-text perplexity stays within (1 + p) of dense; the
    # target above is then ignored.
    max_ppl_increase: float = 0.0
    # Gate policies: compute the prompt dense (sparsify decode only), and/or the first N tokens of a sequence.
    dense_prompt: bool = False
    dense_first: int = 0


@dataclass
class AllocationSection:
    """How the greedy allocation measures block-output error: on a few short windows of the calibration text."""

    num_samples: int = 4
    seq_len: int = 64
    step: float = 0.1  # per-step sparsity increase of an average-sized projection
    # The `kl` allocation's table: each projection gated alone, KL of the next-token distribution on kl_samples x
    # kl_seq_len calibration tokens (cut from the calibration windows, so at most those). Measured for these
    # criteria (comma-separated), and for the recipe's criterion whenever `sparsity.allocation` is kl.
    kl_criteria: str = ""
    kl_samples: int = 8
    kl_seq_len: int = 512
    # fisher: the second-order estimate, one forward and kl_draws backward passes per window, 18 levels;
    # exact: a partial forward per projection and level (5 levels), ~35x the cost at equal tokens.
    kl_estimate: str = "fisher"
    kl_draws: int = 8  # fisher: next tokens sampled from the model per window (the estimate's noise ~ 1/sqrt)


@dataclass
class HoldoutSection:
    """Windows of the calibration text held apart from the statistics and the allocation (drawn beside the
    `data.num_samples` windows), on which --max-ppl-increase and --method auto measure perplexity."""

    num_samples: int = 8


@dataclass
class AutoSection:
    """--method auto: the transforms it tries (each is a calibration of its own); every criterion, allocation and
    policy is tried on each, in the recipe's mode, at its target (realized) or, with a budget, within it."""

    transforms: str = "none,wina"  # comma-separated
    # gate policies it tries: first-N-tokens-dense counts, comma-separated (empty: the recipe's dense_first only)
    dense_first: str = ""
    # compare candidates at the same realized sparsity on the held-apart windows (one more measurement for a
    # candidate whose gates at the target realize more than 0.005 off it), not at the same gate target
    match_realized: bool = True


@dataclass
class DistillSection:
    """Sparsity-aware distillation (off at steps 0): before the statistics, the projection weights are tuned so the
    model, gated top-k at `sparsity` per token, matches the dense original's next-token distribution (KL) on
    windows of `data` (default: the calibration text) that the statistics and held-apart evaluation do not read."""

    steps: int = 0
    batch: int = 2  # windows of data.seq_len tokens per step
    # AdamW, no weight decay. On SmolLM2 (60 steps at 0.5) 1e-4 left the least gated KL and the highest PPL-1%
    # sparsity; 3e-5 moved too little, 3e-4 moved the dense function more than the gates gained.
    lr: float = 1e-4
    # constant | cosine (from lr towards 0 over the steps; from 2e-4 on SmolLM2 it measured even with constant 1e-4)
    schedule: str = "constant"
    sparsity: float = 0.0  # the sparsity trained at (0: sparsity.target)
    # > 0: each step draws its sparsity uniformly from [sparsity, sparsity_max] (seeded), so one set of weights is
    # trained for every target the artifact's tables serve rather than for one
    sparsity_max: float = 0.0
    # topk: each token keeps the same number of channels. quantile: each window's scores are cut at their own
    # `sparsity` quantile, so tokens vary as under calibrated thresholds while the share dropped stays fixed.
    gate: str = "topk"
    # > 0: the loss adds this weight x the gated model's next-token cross-entropy on the distillation text itself,
    # so the weights also fit that text (the deployment's domain), not only the dense original; 0: KL alone
    ce_weight: float = 0.0
    data: str = ""
    check_samples: int = 2  # windows kept back to check that the gated model's loss went down


@dataclass
class ExportSection:
    """ONNX exports `wina calibrate` writes from the finished artifact, each validated as `wina export` validates
    (a failed validation fails the run; the artifact stays, complete and checked)."""

    onnx: str = ""  # folder of the sparse ONNX export, the artifact's gates ("" = none)
    onnx_dense: str = ""  # folder of a dense ONNX export of the same model, the speed baseline ("" = none)
    dtype: str = "float32"  # the graphs' weights: float32 | float16
    attention: str = "fused"  # fused (ONNX Runtime's contrib ops) | plain (standard ops only)
    fuse: bool = False  # the projections that read one input as one node


@dataclass
class Recipe:
    model: str = ""
    data: DataSection = field(default_factory=DataSection)
    transform: str = "wina"  # wina (the paper's) | stacked | pca | pca-global | none
    sparsity: SparsitySection = field(default_factory=SparsitySection)
    allocation: AllocationSection = field(default_factory=AllocationSection)
    holdout: HoldoutSection = field(default_factory=HoldoutSection)
    method: str = "manual"  # manual (the recipe's transform, criterion, allocation) | auto (measured choice)
    auto: AutoSection = field(default_factory=AutoSection)
    distill: DistillSection = field(default_factory=DistillSection)
    seed: int = 0
    dtype: str = "float32"
    output: str = ""
    export: ExportSection = field(default_factory=ExportSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


CHOICES = {
    "transform": ("wina", "stacked", "pca", "pca-global", "none"),
    "sparsity.criterion": ("wina", "teal"),
    "sparsity.allocation": ("greedy", "global", "kl", "uniform"),
    "sparsity.mode": ("threshold", "topk"),
    "allocation.kl_estimate": ("fisher", "exact"),
    "dtype": ("float32", "float16", "bfloat16"),
    "method": ("manual", "auto"),
    "export.dtype": ("float32", "float16"),
    "export.attention": ("fused", "plain"),
    "distill.schedule": ("constant", "cosine"),
    "distill.gate": ("topk", "quantile"),
}


def _build(cls, data: Any, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"`{path or '<top level>'}` must be a mapping, got {type(data).__name__}",
                          "the config is a nested YAML mapping", "see sample_configs/ for the layout")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(f"unknown key `{where}` in the config",
                              f"`{path or 'the top level'}` accepts only: {', '.join(sorted(names))}",
                              "remove or rename the key")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, where)
        else:
            kwargs[key] = _coerce(typ, value, where)
    return cls(**kwargs)


def _coerce(typ, value, where):
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # a one-item list such as `auto.dense_first: 4`
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        raise ConfigError(f"`{where}` must be {typ.__name__}, got {type(value).__name__} ({value!r})",
                          "the schema fixes each key's type", f"write a {typ.__name__} for `{where}`")
    return value


def get_path(recipe: Recipe, dotted: str):
    obj = recipe
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def set_path(recipe: Recipe, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    obj = recipe
    for part in parents:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def distill_sparsity(recipe) -> float:
    """The sparsity distillation trains at, or where its range starts: `distill.sparsity`, 0 meaning the target."""
    return recipe.distill.sparsity or recipe.sparsity.target


def validate(recipe: Recipe, need_data: bool = True) -> Recipe:
    for key, allowed in CHOICES.items():
        v = get_path(recipe, key)
        if v not in allowed:
            raise ConfigError(f"`{key}` is '{v}'", f"it must be one of: {', '.join(allowed)}",
                              f"set `{key}` to one of those")
    t = recipe.sparsity.target
    if not (0.0 <= t <= 0.9):
        raise ConfigError(f"`sparsity.target` is {t}", "a target sparsity must lie in [0, 0.9]",
                          "pass a value such as 0.5")
    p = recipe.sparsity.max_ppl_increase
    if not (0.0 <= p <= 10.0):
        raise ConfigError(f"`sparsity.max_ppl_increase` is {p}", "it is a fraction of the dense perplexity, "
                          "in [0, 10] (0 = off)", "write e.g. 0.01 for 1%")
    bad = [t for t in auto_transforms(recipe) if t not in CHOICES["transform"]] or ([] if auto_transforms(recipe)
                                                                                   else ["<empty>"])
    if bad:
        raise ConfigError(f"`auto.transforms` has {', '.join(bad)}", f"transforms: {', '.join(CHOICES['transform'])}",
                          "write a comma-separated list of those, e.g. none,wina")
    bad = [c for c in kl_criteria(recipe) if c not in CHOICES["sparsity.criterion"]]
    if bad:
        raise ConfigError(f"`allocation.kl_criteria` has {', '.join(bad)}",
                          f"criteria: {', '.join(CHOICES['sparsity.criterion'])}",
                          "write a comma-separated list of those, e.g. teal,wina, or leave it empty")
    for key in ("data.num_samples", "data.seq_len", "allocation.num_samples", "allocation.seq_len",
                "allocation.kl_samples", "allocation.kl_seq_len", "allocation.kl_draws", "holdout.num_samples",
                "distill.batch", "distill.check_samples"):
        if get_path(recipe, key) < 1:
            raise ConfigError(f"`{key}` is {get_path(recipe, key)}", "it must be at least 1", "raise it")
    d = recipe.distill
    if d.steps < 0:
        raise ConfigError(f"`distill.steps` is {d.steps}", "it counts AdamW steps (0: off)", "use 0 or more")
    if not (0.0 < d.lr <= 1e-2):
        raise ConfigError(f"`distill.lr` is {d.lr}", "it is AdamW's learning rate, in (0, 0.01]",
                          "use e.g. 1e-4")
    if not (0.0 <= d.sparsity <= 0.9):
        raise ConfigError(f"`distill.sparsity` is {d.sparsity}", "a sparsity lies in [0, 0.9] (0: sparsity.target)",
                          "pass a value such as 0.4")
    if not (0.0 <= d.ce_weight <= 10.0):
        raise ConfigError(f"`distill.ce_weight` is {d.ce_weight}",
                          "it weighs the text's own next-token cross-entropy against the KL from the dense original, "
                          "in [0, 10] (0: KL alone)", "use e.g. 1.0, or 0")
    lo = distill_sparsity(recipe)
    if d.sparsity_max and not (lo < d.sparsity_max <= 0.9):
        raise ConfigError(f"`distill.sparsity_max` is {d.sparsity_max}, with the range starting at {lo:g}",
                          "it ends the range each distillation step draws its sparsity from: above "
                          "`distill.sparsity` (or sparsity.target when that is 0) and at most 0.9",
                          "raise it above the start, or set 0 to train at one sparsity")
    if recipe.allocation.seq_len > recipe.data.seq_len:
        raise ConfigError(f"`allocation.seq_len` ({recipe.allocation.seq_len}) exceeds `data.seq_len` "
                          f"({recipe.data.seq_len})", "allocation windows are cut from the calibration windows",
                          "lower allocation.seq_len")
    if recipe.allocation.num_samples > recipe.data.num_samples:
        raise ConfigError(f"`allocation.num_samples` ({recipe.allocation.num_samples}) exceeds "
                          f"`data.num_samples` ({recipe.data.num_samples})",
                          "allocation windows are a subset of the calibration windows", "lower allocation.num_samples")
    auto_dense_first(recipe)
    if recipe.sparsity.dense_first < 0:
        raise ConfigError(f"`sparsity.dense_first` is {recipe.sparsity.dense_first}", "it counts tokens",
                          "use 0 (off) or a positive count")
    if not (0.0 < recipe.allocation.step <= 0.5):
        raise ConfigError(f"`allocation.step` is {recipe.allocation.step}", "it must lie in (0, 0.5]",
                          "use e.g. 0.05")
    if not recipe.model:
        raise ConfigError("no model given", "calibration needs a checkpoint",
                          "pass --model or set `model:` in the config")
    folders = {k: v for k, v in (("output", recipe.output), ("export.onnx", recipe.export.onnx),
                                 ("export.onnx_dense", recipe.export.onnx_dense)) if v}
    for a, b in ((a, b) for i, a in enumerate(folders) for b in list(folders)[i + 1:]):
        if Path(folders[a]).resolve() == Path(folders[b]).resolve():
            raise ConfigError(f"`{a}` and `{b}` are the same folder ({folders[a]})",
                              "the artifact and each ONNX export are folders of their own",
                              f"give `{b}` another path")
    if need_data and not recipe.data.path:
        raise ConfigError("no calibration data given", "thresholds are calibrated on sample text",
                          "pass --data or set `data.path` in the config")
    return recipe


def kl_criteria(recipe: Recipe) -> list[str]:
    """The criteria whose KL table the calibration measures (the kl allocation needs it)."""
    names = [c.strip() for c in recipe.allocation.kl_criteria.split(",") if c.strip()]
    if recipe.sparsity.allocation == "kl":
        names.append(recipe.sparsity.criterion)
    return list(dict.fromkeys(names))


def auto_transforms(recipe: Recipe) -> list[str]:
    return [t.strip() for t in recipe.auto.transforms.split(",") if t.strip()]


def auto_dense_first(recipe: Recipe) -> list[int]:
    """The dense-first policies --method auto compares (the recipe's own when auto.dense_first is empty)."""
    text = str(recipe.auto.dense_first).strip()
    if not text:
        return [recipe.sparsity.dense_first]
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = [-1]
    if not vals or any(v < 0 for v in vals):
        raise ConfigError(f"`auto.dense_first` is '{text}'", "it lists token counts the first-tokens-dense policy "
                          "tries (0 = off)", "write a comma-separated list of counts, e.g. 0,4")
    return list(dict.fromkeys(vals))


def needs_holdout(recipe: Recipe) -> bool:
    return recipe.method == "auto" or recipe.sparsity.max_ppl_increase > 0


def load_recipe(path: str | None) -> Recipe:
    if path is None:
        return Recipe()
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' does not exist", "--config names a YAML file", "check the path")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML", str(e).replace("\n", " "),
                          "fix the YAML syntax") from e
    return _build(Recipe, data, "")


def recipe_from_dict(data: dict) -> Recipe:
    return _build(Recipe, data, "")
