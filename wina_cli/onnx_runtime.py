"""Running an ONNX artifact with ONNX Runtime: sessions (native kernels registered when present), providers, and
a KV-cache decoder loop shared by `wina generate`, `wina bench` and the export's validation.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import native
from .errors import ArtifactError, NotAvailableError

ONNX_MODEL = "model.onnx"
ONNX_MANIFEST = "wina_onnx.json"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def cuda_usable() -> bool:
    """Whether a session asking for CUDA really gets it (onnxruntime-gpu lists the provider even where no GPU or
    CUDA library is present, and falls back to CPU when a session is created)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if PROVIDERS["cuda"] not in ort.get_available_providers():
        return False
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    ort.set_default_logger_severity(4)
    try:
        sess = ort.InferenceSession(m.SerializeToString(), providers=[PROVIDERS["cuda"], PROVIDERS["cpu"]])
        return PROVIDERS["cuda"] in sess.get_providers()
    except Exception:  # noqa: BLE001 - any failure means: not usable
        return False
    finally:
        ort.set_default_logger_severity(2)


@dataclass
class SessionInfo:
    provider: str  # the provider asked for: cpu | cuda
    providers: list[str]  # what the session actually runs on
    native_library: str | None  # the registered kernel library, None when the function bodies run
    notes: list[str] = field(default_factory=list)


def make_session(model_path: str | Path, provider: str = "cpu", use_native: bool = True, strict: bool = False,
                 threads: int | None = None):
    """An InferenceSession for the model; registers wina's native kernels when asked and present.

    CUDA asked for where it cannot run falls back to CPU with a note, or fails with `strict`.
    """
    import onnxruntime as ort

    if provider not in PROVIDERS:
        from .errors import ConfigError

        raise ConfigError(f"unknown provider '{provider}'", f"wina runs ONNX on {', '.join(PROVIDERS)}",
                          "pass --provider cpu or --provider cuda")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3  # a CUDA provider that cannot load is reported by wina, not as a wall of log lines
    lib = None
    notes = []
    if use_native:
        lib = native.cuda_library() if provider == "cuda" else None
        lib = lib or native.cpu_library()
        if lib is not None:
            try:
                so.register_custom_ops_library(str(lib))
            except Exception as e:  # noqa: BLE001 - any load failure means: run the function bodies instead
                notes.append(f"native kernels at {lib} could not be loaded ({e}); using the graph's function bodies")
                lib = None
    wanted = [PROVIDERS[provider]] + ([PROVIDERS["cpu"]] if provider != "cpu" else [])
    if provider != "cpu":
        # A provider that cannot load logs a page of errors from ONNX Runtime; wina reports it in one line below.
        ort.set_default_logger_severity(4)
    try:
        sess = ort.InferenceSession(str(model_path), so, providers=wanted)
    except Exception as e:  # noqa: BLE001 - ORT raises its own exception types
        raise ArtifactError(f"ONNX Runtime cannot load '{model_path}'", str(e).splitlines()[0][:300],
                            "re-export the model with `wina export --format onnx`") from e
    finally:
        ort.set_default_logger_severity(2)
    got = sess.get_providers()
    if PROVIDERS[provider] not in got:
        msg = (f"the {provider.upper()} execution provider is not usable on this machine "
               f"(available: {', '.join(available_providers())}; the session got {', '.join(got)})")
        if strict:
            raise NotAvailableError(msg, "--strict forbids falling back to another provider",
                                    "run on a machine with a working CUDA set-up, or drop --strict to use the CPU")
        notes.append(msg + "; falling back to CPU")
    return sess, SessionInfo(provider, got, str(lib) if lib else None, notes)


class OnnxDecoder:
    """The exported decoder with its KV cache: prefill a batch of prompts, then one token per step."""

    def __init__(self, folder: str | Path, provider: str = "cpu", use_native: bool = True, strict: bool = False,
                 threads: int | None = None, extra_outputs: list[str] | None = None):
        folder = Path(folder)
        path = folder / ONNX_MODEL if folder.is_dir() else folder
        if not path.is_file():
            raise ArtifactError(f"'{path}' does not exist", "an ONNX artifact folder holds model.onnx",
                                "export one with `wina export ARTIFACT --format onnx --output DIR`")
        self.path = path
        self.session, self.info = make_session(path, provider, use_native, strict, threads)
        self.past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        shape = next(i.shape for i in self.session.get_inputs() if i.name == self.past_names[0])
        self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        self.extra_outputs = list(extra_outputs or [])
        self.output_names = ["logits"] + self.present_names + self.extra_outputs
        self.extra: dict[str, np.ndarray] = {}  # the extra outputs of the last run
        # A graph whose gate policy keeps the prompt dense takes the prompt's length on every call.
        self.takes_prompt_len = any(i.name == "dense_until" for i in self.session.get_inputs())
        self.prompt_len = 0  # set by prefill

    def empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return {n: z for n in self.past_names}

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                 "position_ids": position_ids.astype(np.int64), **cache}
        if self.takes_prompt_len:
            feeds["dense_until"] = np.array(self.prompt_len, np.int64)
        outs = self.session.run(self.output_names, feeds)
        n = 1 + len(self.present_names)
        new_cache = {p: v for p, v in zip(self.past_names, outs[1:n])}
        self.extra = dict(zip(self.extra_outputs, outs[n:]))
        return outs[0], new_cache

    def prefill(self, ids: np.ndarray):
        """ids [batch, seq] -> logits [batch, seq, vocab], cache, attention mask."""
        b, s = ids.shape
        self.prompt_len = s
        mask = np.ones((b, s), np.int64)
        pos = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s))
        logits, cache = self.run(ids, mask, pos, self.empty_cache(b))
        return logits, cache, mask

    def step(self, tokens: np.ndarray, cache: dict, mask: np.ndarray):
        """tokens [batch] appended after the cached ones -> logits [batch, vocab], cache, mask."""
        b = tokens.shape[0]
        past = mask.shape[1]
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
        pos = np.full((b, 1), past, np.int64)
        logits, cache = self.run(tokens.reshape(b, 1), mask, pos, cache)
        return logits[:, -1], cache, mask

    def greedy(self, ids: np.ndarray, max_new_tokens: int, eos: int | None = None) -> list[int]:
        logits, cache, mask = self.prefill(ids[None, :] if ids.ndim == 1 else ids)
        tok = int(logits[0, -1].argmax())
        out = [tok]
        for _ in range(max_new_tokens - 1):
            if eos is not None and tok == eos:
                break
            logits, cache, mask = self.step(np.array([tok]), cache, mask)
            tok = int(logits[0].argmax())
            out.append(tok)
        return out


def describe_gates(gates: dict) -> str:
    """An ONNX manifest's gates in words."""
    if gates.get("dense"):
        return "none (dense export)"
    text = f"{gates['criterion']}/{gates['allocation']}, {gates['mode']}, target {gates['target']}"
    pol = gates.get("policy")
    if pol:
        text += f"; policy: {pol['text']}" + (f" (graph input {pol['input']})" if pol.get("input") else "")
    return text


def read_onnx_manifest(folder: str | Path) -> dict:
    p = Path(folder) / ONNX_MANIFEST
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"'{folder}' is not an ONNX artifact of wina", f"{ONNX_MANIFEST} is missing or broken "
                            f"({e})", "export one with `wina export ARTIFACT --format onnx --output DIR`") from e


def verify_onnx_files(folder: str | Path, manifest: dict) -> None:
    """Check every file the manifest lists against its size and sha256."""
    from .artifact import verify_files

    verify_files(Path(folder), manifest, "ONNX export",
                 "export it again with `wina export ARTIFACT --format onnx`")


def warn(notes: list[str]) -> None:
    for n in notes:
        sys.stderr.write(f"wina: {n}\n")
