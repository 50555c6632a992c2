"""Running an ONNX artifact with ONNX Runtime: sessions (native kernels registered when present), providers, and
a KV-cache decoder loop shared by `wina generate`, `wina bench` and the export's validation.
"""
from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import native
from .errors import ArtifactError, NotAvailableError, WinaError

ONNX_MODEL = "model.onnx"
ONNX_MANIFEST = "wina_onnx.json"
# Graph metadata: "shared-buffer" where a past KV input and its present output may be one buffer of fixed capacity,
# appended to in place (the graph reads the true lengths from attention_mask, not from the past's shape).
KV_CACHE_KEY = "wina.kv_cache"
SHARED_BUFFER = "shared-buffer"
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
                 threads: int | None = None, profile_prefix: str | None = None, spin: bool = True):
    """An InferenceSession for the model; registers wina's native kernels when asked and present.

    CUDA asked for where it cannot run falls back to CPU with a note, or fails with `strict`. With
    `profile_prefix`, ONNX Runtime's profiler records every node's time (`session.end_profiling()` writes it).
    `spin=False`: the intra-op threads sleep when idle instead of spinning (ONNX Runtime's default), so they leave
    the cores to another session that runs next.
    """
    import onnxruntime as ort

    if provider not in PROVIDERS:
        from .errors import ConfigError

        raise ConfigError(f"unknown provider '{provider}'", f"wina runs ONNX on {', '.join(PROVIDERS)}",
                          "pass --provider cpu or --provider cuda")
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    if not spin:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
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
        with native.task_count(threads) if lib is not None else nullcontext():
            sess = ort.InferenceSession(str(model_path), so, providers=wanted)
    except WinaError:
        raise
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


class KVBuffers:
    """The KV cache as one buffer per past input, [batch, kv_heads, capacity, head_dim], bound as both the past
    input and the present output, so ONNX Runtime's GroupQueryAttention appends each step's keys and values in
    place instead of copying the whole cache into new outputs (the copy, and handing 2 x layers arrays to and from
    Python, took 1.0-1.7 ms of a SmolLM2 decode step of 12-25 ms on the 2-core machine). A buffer grows by doubling
    when a step would pass its capacity. The buffers change in place: a cache serves the next step only.
    """

    def __init__(self, names: list[str], batch: int, kv_heads: int, head_dim: int, capacity: int):
        self.length, self.binding = 0, None
        self.arrays = {n: np.zeros((batch, kv_heads, capacity, head_dim), np.float32) for n in names}
        self.values = self._wrap()

    def _wrap(self) -> dict:
        import onnxruntime as ort

        return {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.arrays.items()}

    @property
    def capacity(self) -> int:
        return next(iter(self.arrays.values())).shape[2]

    @property
    def batch(self) -> int:
        return next(iter(self.arrays.values())).shape[0]

    def view(self, name: str) -> np.ndarray:
        """The filled part of one buffer, [batch, kv_heads, length, head_dim]."""
        return self.arrays[name][:, :, :self.length]

    def reserve(self, total: int) -> None:
        if total <= self.capacity:
            return
        cap = max(total, 2 * self.capacity)
        for n, a in self.arrays.items():
            grown = np.zeros(a.shape[:2] + (cap,) + a.shape[3:], np.float32)
            grown[:, :, :self.length] = a[:, :, :self.length]
            self.arrays[n] = grown
        self.values, self.binding = self._wrap(), None


class OnnxDecoder:
    """The exported decoder with its KV cache: prefill a batch of prompts, then one token per step.

    On the CPU, a graph whose metadata says its KV cache may be a shared buffer runs with `KVBuffers` (in place);
    other graphs, and other providers, pass the cache as arrays that each step returns anew."""

    def __init__(self, folder: str | Path, provider: str = "cpu", use_native: bool = True, strict: bool = False,
                 threads: int | None = None, extra_outputs: list[str] | None = None,
                 shared_cache: bool | None = None, profile_prefix: str | None = None, spin: bool = True):
        folder = Path(folder)
        path = folder / ONNX_MODEL if folder.is_dir() else folder
        if not path.is_file():
            raise ArtifactError(f"'{path}' does not exist", "an ONNX artifact folder holds model.onnx",
                                "export one with `wina export ARTIFACT --format onnx --output DIR`")
        self.path = path
        self.session, self.info = make_session(path, provider, use_native, strict, threads, profile_prefix, spin)
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
        meta = self.session.get_modelmeta().custom_metadata_map
        can_share = meta.get(KV_CACHE_KEY) == SHARED_BUFFER and self.info.providers[0] == PROVIDERS["cpu"]
        self.shared_cache = can_share if shared_cache is None else shared_cache and can_share

    def empty_cache(self, batch: int, capacity: int | None = None):
        """An empty cache: `KVBuffers` of `capacity` positions where the cache is shared, else arrays of length 0."""
        if self.shared_cache:
            return KVBuffers(self.past_names, batch, self.kv_heads, self.head_dim, max(1, capacity or 256))
        z = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return {n: z for n in self.past_names}

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
            cache) -> tuple[np.ndarray, dict | KVBuffers]:
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                 "position_ids": position_ids.astype(np.int64)}
        if self.takes_prompt_len:
            feeds["dense_until"] = np.array(self.prompt_len, np.int64)
        if isinstance(cache, KVBuffers):
            return self._run_shared(feeds, cache)
        outs = self.session.run(self.output_names, {**feeds, **cache})
        n = 1 + len(self.present_names)
        new_cache = {p: v for p, v in zip(self.past_names, outs[1:n])}
        self.extra = dict(zip(self.extra_outputs, outs[n:]))
        return outs[0], new_cache

    def _run_shared(self, feeds: dict, cache: KVBuffers) -> tuple[np.ndarray, KVBuffers]:
        batch, seq = feeds["input_ids"].shape
        total = feeds["attention_mask"].shape[1]
        if batch != cache.batch or total != cache.length + seq:
            raise ValueError(f"a KV cache of batch {cache.batch} holding {cache.length} positions does not fit a call "
                             f"of batch {batch} with {seq} new and {total} total positions (a cache serves the "
                             "step after the one that returned it)")
        cache.reserve(total)
        if cache.binding is None:
            cache.binding = self.session.io_binding()
            for past, present in zip(self.past_names, self.present_names):
                v = cache.values[past]
                cache.binding.bind_ortvalue_input(past, v)
                cache.binding.bind_ortvalue_output(present, v)
        b = cache.binding
        held = {name: np.ascontiguousarray(arr) for name, arr in feeds.items()}  # alive until the run is over
        for name, arr in held.items():
            b.bind_cpu_input(name, arr)
        for name in ["logits"] + self.extra_outputs:
            b.bind_output(name)  # unallocated again: a bound output keeps the last run's shape otherwise
        self.session.run_with_iobinding(b)
        cache.length = total
        # numpy() views the output's memory and keeps it alive; the next run binds a new output (a prefill's
        # logits are tens of MB, not worth a copy)
        outs = [v.numpy() for v in b.get_outputs()[len(self.present_names):]]
        self.extra = dict(zip(self.extra_outputs, outs[1:]))
        return outs[0], cache

    def prefill(self, ids: np.ndarray, capacity: int | None = None):
        """ids [batch, seq] -> logits [batch, seq, vocab], cache, attention mask. `capacity`: the positions a
        shared cache holds before it grows (the prompt plus the tokens to come)."""
        b, s = ids.shape
        self.prompt_len = s
        mask = np.ones((b, s), np.int64)
        pos = np.broadcast_to(np.arange(s, dtype=np.int64), (b, s))
        logits, cache = self.run(ids, mask, pos, self.empty_cache(b, capacity or s + 256))
        return logits, cache, mask

    def step(self, tokens: np.ndarray, cache: dict | KVBuffers, mask: np.ndarray):
        """tokens [batch] appended after the cached ones -> logits [batch, vocab], cache, mask."""
        b = tokens.shape[0]
        past = mask.shape[1]
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], axis=1)
        pos = np.full((b, 1), past, np.int64)
        logits, cache = self.run(tokens.reshape(b, 1), mask, pos, cache)
        return logits[:, -1], cache, mask

    def generate(self, ids, max_new_tokens: int, pick=None, eos: int | None = None,
                 on_token=None) -> list[int]:
        """Batch-1 generation: the prompt `ids` [seq] (or [1, seq]) in one run, then one step per token; `pick`
        maps a step's logits to the next token (default greedy; see `sampling.TokenPicker`)."""
        from .sampling import decode_tokens

        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[None, :] if ids.ndim == 1 else ids
        logits, cache, mask = self.prefill(ids, capacity=ids.shape[1] + max_new_tokens)
        state = [cache, mask]

        def step(tok: int):
            logits, state[0], state[1] = self.step(np.array([tok]), state[0], state[1])
            return logits[0]

        return decode_tokens(logits[0, -1], step, max_new_tokens, pick or (lambda z: int(z.argmax())), eos, on_token)

    def greedy(self, ids: np.ndarray, max_new_tokens: int, eos: int | None = None) -> list[int]:
        return self.generate(ids, max_new_tokens, eos=eos)


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
