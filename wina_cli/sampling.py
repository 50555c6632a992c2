"""How generation picks each next token from a step's logits, the same way for the torch runtime and ONNX Runtime:
greedy (temperature 0), or sampled after temperature, top-k and top-p (nucleus) from a generator seeded by the
user, so the same seed gives the same tokens."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from .errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: every token is a candidate
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int = 0

    def check(self) -> "Sampling":
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"--temperature {self.temperature} is not a finite number >= 0",
                              "the logits are divided by the temperature before sampling (0 means greedy)",
                              "pass e.g. --temperature 0.7, or 0 for greedy decoding")
        if self.top_k < 0:
            raise ConfigError(f"--top-k {self.top_k} is negative", "top-k keeps the k most likely tokens (0: all)",
                              "pass e.g. --top-k 50, or 0 to keep every token")
        if not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"--top-p {self.top_p} is outside (0, 1]",
                              "top-p keeps the most likely tokens whose probabilities add up to p",
                              "pass e.g. --top-p 0.9, or 1 to keep every token")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    def describe(self) -> dict:
        return {"greedy": True} if self.greedy else {"greedy": False, **asdict(self)}


class TokenPicker:
    """Callable: logits [vocab] -> the next token id. One picker per generated sequence (it owns the generator)."""

    def __init__(self, sampling: Sampling = Sampling()):
        self.s = sampling.check()
        self.rng = np.random.default_rng(sampling.seed)

    def __call__(self, logits: np.ndarray) -> int:
        if self.s.greedy:  # on every decode step: no float64 copy of the vocabulary's logits for an argmax
            return int(np.asarray(logits).argmax())
        z = np.asarray(logits, dtype=np.float64).reshape(-1)
        if 0 < self.s.top_k < z.size:
            cand = np.argpartition(-z, self.s.top_k - 1)[: self.s.top_k]
        else:
            cand = np.arange(z.size)
        # Candidates by descending logit, ties by token id, so the draw below does not depend on the partition.
        cand = cand[np.lexsort((cand, -z[cand]))]
        p = np.exp((z[cand] - z[cand[0]]) / self.s.temperature)
        p /= p.sum()
        if self.s.top_p < 1.0:
            # The smallest prefix whose mass reaches top_p: a token stays if the mass before it is still short.
            before = np.cumsum(p) - p
            keep = int(np.count_nonzero(before < self.s.top_p))
            cand, p = cand[:keep], p[:keep] / p[:keep].sum()
        i = int(np.searchsorted(np.cumsum(p), self.rng.random() * p.sum(), side="right"))
        return int(cand[min(i, cand.size - 1)])


def decode_tokens(first_logits: np.ndarray, step: Callable[[int], np.ndarray], max_new_tokens: int,
                  pick: Callable[[np.ndarray], int], eos: int | None = None,
                  on_token: Callable[[list[int]], None] | None = None) -> list[int]:
    """The generation loop: pick a token from the prompt's last logits, then feed each token back through `step`
    (token -> the next logits) until `max_new_tokens` are out or the end-of-sequence token was produced (it is
    returned). `on_token` sees the tokens so far after each one (for streaming)."""
    out = [pick(first_logits)]
    while True:
        if on_token is not None:
            on_token(out)
        if len(out) >= max_new_tokens or (eos is not None and out[-1] == eos):
            return out
        out.append(pick(step(out[-1])))
