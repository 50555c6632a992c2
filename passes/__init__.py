"""Pipeline passes. `build_pipeline` composes them from a recipe, in the one order that makes sense:
load -> [fold_norms -> rotate] -> tokenize -> collect_stats -> allocate -> set_gates."""
from __future__ import annotations


def build_pipeline(recipe):
    from .allocate import Allocate
    from .base import Pipeline
    from .fold_norms import FoldNorms
    from .load import LoadCheckpoint
    from .rotate import RotateWina
    from .set_gates import SetGates
    from .stats import CollectStats
    from .tokenize import TokenizeCalibration

    passes = [LoadCheckpoint()]
    if recipe.transform == "wina":
        passes += [FoldNorms(), RotateWina()]
    passes += [TokenizeCalibration(), CollectStats(), Allocate(), SetGates()]
    return Pipeline(passes)
