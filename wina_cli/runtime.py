"""The torch runtime: an artifact (or a pipeline's model) as a runnable model with real gates.

It is the reference every export is validated against: forward, perplexity and generation run through the same
block forward and GatedLinear as calibration did.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .artifact import WEIGHTS, Artifact, read_artifact
from .blocks import BASIS_BUFFERS, install_block_forward, set_basis_buffers
from .errors import ArtifactError, ConfigError
from .gating import ALLOCATIONS, KL_LEVELS_EXACT, Allocation, CalibrationStats, GatePlan, GateSet, plan_gates
from .models.adapters import PROJECTIONS, Adapter, adapter_for
from .models.load import DTYPES
from .sparse import CRITERIA, MODES

GATE_PREFIX = "wina."


def gate_tensors(stats: CalibrationStats, alloc: Allocation, plan: GatePlan) -> dict[str, torch.Tensor]:
    t = {
        "wina.in_features": stats.in_features, "wina.out_features": stats.out_features,
        "wina.col_norms": stats.col_norms, "wina.sizes": alloc.sizes,
        "wina.gate.sparsity": plan.sparsity, "wina.gate.threshold": plan.threshold, "wina.gate.k": plan.k,
        "wina.calibration_tokens": torch.tensor([stats.tokens], dtype=torch.int64),
    }
    for c, q in stats.quantiles.items():
        t[f"wina.quantiles.{c}"] = q
    for c, paths in alloc.greedy.items():
        for l, path in enumerate(paths):
            t[f"wina.greedy.{c}.{l}"] = path
    for c in alloc.layer_path:
        t[f"wina.sensitivity.{c}"] = alloc.sensitivity[c]
        t[f"wina.layer_path.{c}"] = alloc.layer_path[c]
    for c, table in alloc.kl.items():
        t[f"wina.kl.{c}"] = table
        t[f"wina.kl_levels.{c}"] = alloc.kl_levels[c]
    return {k: v.contiguous() for k, v in t.items()}


# The tensor whose presence says an allocation was measured for a criterion (uniform needs none).
ALLOCATION_KEYS = {"greedy": "wina.greedy.{c}.0", "global": "wina.layer_path.{c}", "kl": "wina.kl.{c}"}


def has_table(keys, criterion: str, allocation: str) -> bool:
    """Whether tensor names `keys` hold the table `allocation` plans from for `criterion`."""
    return allocation == "uniform" or ALLOCATION_KEYS[allocation].format(c=criterion) in keys


def read_gate_tensors(t: dict[str, torch.Tensor], wina_cfg: dict) -> tuple[CalibrationStats, Allocation, GatePlan]:
    try:
        stats = CalibrationStats({c: t[f"wina.quantiles.{c}"].float() for c in CRITERIA},
                                 t["wina.col_norms"].float(), t["wina.in_features"], t["wina.out_features"],
                                 int(t["wina.calibration_tokens"][0]))
        L = stats.num_layers
        have = {a: [c for c in CRITERIA if has_table(t, c, a)] for a in ALLOCATION_KEYS}
        alloc = Allocation(t["wina.sizes"].float(),
                           {c: [t[f"wina.greedy.{c}.{l}"].float() for l in range(L)] for c in have["greedy"]},
                           {c: t[f"wina.sensitivity.{c}"].float() for c in have["global"]},
                           {c: t[f"wina.layer_path.{c}"].float() for c in have["global"]},
                           {c: t[f"wina.kl.{c}"].float() for c in have["kl"]},
                           # artifacts of the first kl allocation (exact probe only) stored no levels
                           {c: t.get(f"wina.kl_levels.{c}", torch.tensor((0.0,) + KL_LEVELS_EXACT)).float()
                            for c in have["kl"]})
        plan = GatePlan(wina_cfg["criterion"], wina_cfg["mode"], wina_cfg["allocation"], float(wina_cfg["target"]),
                        t["wina.gate.sparsity"].float(), t["wina.gate.threshold"].float(), t["wina.gate.k"])
    except KeyError as e:
        raise ArtifactError(f"the artifact's weights lack gate tensor {e}", "the file is not a complete wina artifact",
                            "rebuild it with `wina calibrate`") from e
    return stats, alloc, plan


def artifact_allocations(path: str | Path) -> set[tuple[str, str]]:
    """The (criterion, allocation) pairs an artifact can plan, from its tensor names alone (nothing is loaded),
    so a long benchmark can refuse a pair before it measures anything."""
    from safetensors import safe_open

    art = read_artifact(path, verify=False)
    try:
        with safe_open(str(art.path / WEIGHTS), "pt") as f:
            keys = set(f.keys())
    except Exception as e:
        raise ArtifactError(f"'{WEIGHTS}' in '{art.path}' cannot be read", str(e), "rebuild the artifact") from e
    return {(c, a) for c in CRITERIA for a in ALLOCATIONS if has_table(keys, c, a)}


def missing_allocation(path, criterion: str, allocation: str) -> ArtifactError:
    fix = (f"recalibrate with `allocation.kl_criteria: {criterion}` (or `--allocation kl --criterion "
           f"{criterion}`), or pick another allocation" if allocation == "kl"
           else f"pick another allocation (e.g. {criterion}/uniform), or recalibrate")
    where = f"'{path}'" if path is not None else "the artifact"
    return ArtifactError(f"{where} has no {allocation} allocation for criterion '{criterion}'",
                         "it was calibrated without it (the KL tables are measured only for the criteria asked "
                         "for; artifacts older than the global allocation lack its layer paths)", fix)


def policy_text(wina: dict) -> str:
    """The gate policy of an artifact's wina block, in words."""
    parts = (["dense prompt"] if wina.get("dense_prompt") else []) + \
        ([f"first {wina['dense_first']} tokens dense"] if wina.get("dense_first") else [])
    return ", ".join(parts) or "every token sparse"


@dataclass
class Runtime:
    model: torch.nn.Module
    tokenizer: object
    adapter: Adapter
    gateset: GateSet
    stats: CalibrationStats
    allocation: Allocation
    plan: GatePlan | None  # the gates in force; None = dense
    default_plan: GatePlan
    artifact: Artifact | None = None

    def use_plan(self, plan: GatePlan | None) -> None:
        self.plan = plan
        self.gateset.apply(plan, self.stats.col_norms, self.stats.in_features)

    def plan_for(self, criterion: str, mode: str, allocation: str, target: float) -> GatePlan:
        if criterion not in CRITERIA or mode not in MODES or allocation not in ALLOCATIONS:
            raise ConfigError(f"unknown gate setting {criterion}/{mode}/{allocation}",
                              f"criteria: {CRITERIA}, modes: {MODES}, allocations: {ALLOCATIONS}", "pick from those")
        if not 0.0 <= target <= 0.9:
            raise ConfigError(f"target sparsity {target} is out of range", "targets lie in [0, 0.9]",
                              "pick a value such as 0.5")
        if not self.allocation.has(criterion, allocation):
            raise missing_allocation(self.artifact.path if self.artifact is not None else None, criterion,
                                     allocation)
        return plan_gates(self.stats, self.allocation, criterion, mode, allocation, target)

    def dense(self):
        self.use_plan(None)

    # Gate policy, from the artifact's recipe: the prompt computed dense, and/or the first N tokens.
    def gate_policy(self) -> tuple[int, bool]:
        """(N: the first N tokens dense, whether the prompt is dense)."""
        w = self.artifact.wina if self.artifact is not None else {}
        return int(w.get("dense_first", 0) or 0), bool(w.get("dense_prompt", False))

    def dense_until_policy(self, prompt_len: int = 0) -> int:
        first, prompt = self.gate_policy()
        return max(first, prompt_len if prompt else 0)

    def policy_text(self) -> str:
        return policy_text(self.artifact.wina if self.artifact is not None else {})

    @torch.no_grad()
    def generate(self, ids: list[int], max_new_tokens: int, pick, eos: int | None = None, on_token=None) -> list[int]:
        """Batch-1 generation with a KV cache and the gates in force (and the artifact's gate policy): `pick` maps a
        step's logits to the next token (`sampling.TokenPicker`). Returns the new tokens."""
        from .sampling import decode_tokens

        prompt = torch.as_tensor(ids, dtype=torch.int64)[None]
        if self.plan is not None:
            self.gateset.set_dense_until(self.dense_until_policy(prompt.shape[1]))
        key = cache_argument(self.model)
        first = self.model(input_ids=prompt, use_cache=True)
        cache = getattr(first, key)

        def step(tok: int):
            nonlocal cache
            o = self.model(input_ids=torch.tensor([[tok]]), use_cache=True, **{key: cache})
            cache = getattr(o, key)
            return o.logits[0, -1].float().numpy()

        return decode_tokens(first.logits[0, -1].float().numpy(), step, max_new_tokens, pick, eos, on_token)


def cache_argument(model) -> str:
    """The name a model's forward takes its KV cache by, and returns it under: transformers 5.x before 5.24 says
    past_key_values, later releases cache (the old name warns, and goes in 5.40)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def load_runtime(path: str | Path, dtype: str | None = None, verify: bool = True, partial: bool = False) -> Runtime:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    art = read_artifact(path, verify=verify, partial=partial)
    wcfg = art.wina
    config = AutoConfig.from_pretrained(str(art.path), local_files_only=True)
    torch_dtype = DTYPES[dtype or wcfg.get("dtype", "float32")]
    try:
        tensors = load_file(str(art.path / WEIGHTS))
    except Exception as e:
        raise ArtifactError(f"'{WEIGHTS}' in '{art.path}' cannot be read", str(e), "rebuild the artifact") from e
    model_sd = {k: v for k, v in tensors.items() if not k.startswith(GATE_PREFIX)}
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.eval()
    adapter = adapter_for(model)
    for l, layer in enumerate(adapter.layers()):
        mats = {}
        for name in BASIS_BUFFERS:
            key = next((k for k in model_sd if k.endswith(f"layers.{l}.{name}")), None)
            if key is not None:
                mats[name] = torch.empty_like(model_sd[key], dtype=torch_dtype)
        if mats:
            set_basis_buffers(layer, **mats)
    model_sd = {k: v.to(torch_dtype) if v.is_floating_point() else v for k, v in model_sd.items()}
    # assign: the loaded tensors become the parameters, so the randomly initialized ones are freed instead of
    # being overwritten while both copies are alive.
    missing, unexpected = model.load_state_dict(model_sd, strict=False, assign=True)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    allowed_missing = {"lm_head.weight"} if tied else set()
    if set(missing) - allowed_missing or unexpected:
        raise ArtifactError(f"the weights in '{art.path}' do not fit its config",
                            f"missing {sorted(set(missing) - allowed_missing)[:5]}, unexpected {sorted(unexpected)[:5]}",
                            "rebuild the artifact")
    if tied:
        model.tie_weights()
    install_block_forward(adapter)
    stats, alloc, plan = read_gate_tensors(tensors, wcfg)
    tokenizer = AutoTokenizer.from_pretrained(str(art.path), local_files_only=True)
    rt = Runtime(model, tokenizer, adapter, GateSet(adapter), stats, alloc, None, plan, art)
    rt.use_plan(plan)
    return rt
