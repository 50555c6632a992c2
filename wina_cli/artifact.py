"""The artifact folder: its format, an atomic writer, checksums and a reader.

An artifact is a folder:
    config.json        the model's Hugging Face config plus a `wina` block (format_version, transform, gates)
    model.safetensors  the weights as the runtime needs them (transformed where asked, with the residual basis
                       matrices as `model.layers.N.wina_*` buffers) and the gate tensors under `wina.`
    tokenizer files
    recipe.yaml        the resolved recipe (output left empty): `wina calibrate --config recipe.yaml -o DIR`
                       rebuilds the same bytes
    wina.json          the manifest: versions, source and its hash, passes, calibration provenance, per-layer
                       gate table, validation results, and the sha256 of every other file
Nothing is written in place: a folder is assembled beside the destination and renamed into place only once
complete and validated, so an interrupted run leaves no artifact behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactError, OutputExistsError

FORMAT_VERSION = 1
MANIFEST = "wina.json"
WEIGHTS = "model.safetensors"
RECIPE = "recipe.yaml"
REQUIRED = ("config.json", WEIGHTS, MANIFEST)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != MANIFEST:
            out[str(f.relative_to(folder))] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    return out


def check_output(output: str | os.PathLike, overwrite: bool) -> Path:
    out = Path(output)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output '{out}' already exists", "wina never replaces a folder silently",
                                "pass --overwrite, or choose another --output")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output '{out}' exists and is a file", "an artifact is a folder",
                                "remove the file or choose another --output")
    return out


def _remove_stale_partials(out: Path) -> None:
    """A run killed mid-write leaves its hidden partial folder; remove those whose process is gone."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(p, ignore_errors=True)
        except PermissionError:
            pass


@contextlib.contextmanager
def atomic_folder(output: str | os.PathLike, overwrite: bool):
    """Yield a temporary folder beside `output`; on success it replaces `output`, on failure it is removed."""
    out = check_output(output, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    trash = None
    if out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(trash)
    tmp.rename(out)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def write_manifest(folder: Path, manifest: dict) -> None:
    manifest = dict(manifest)
    manifest["format_version"] = FORMAT_VERSION
    manifest["files"] = file_table(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


@dataclass
class Artifact:
    path: Path
    manifest: dict
    config: dict

    @property
    def wina(self) -> dict:
        return self.config.get("wina", {})


def read_artifact(path: str | os.PathLike, verify: bool = True, partial: bool = False) -> Artifact:
    """Read and check an artifact. `partial` reads a folder still being assembled (no manifest yet)."""
    p = Path(path)
    if partial:
        return Artifact(p, {}, json.loads((p / "config.json").read_text()))
    if not p.is_dir():
        raise ArtifactError(f"artifact '{p}' does not exist or is not a folder",
                            "wina reads artifact folders written by `wina calibrate` or `wina export`",
                            "check the path")
    missing = [f for f in REQUIRED if not (p / f).is_file()]
    if missing:
        raise ArtifactError(f"artifact '{p}' is incomplete: missing {', '.join(missing)}",
                            "an artifact holds config.json, model.safetensors and wina.json",
                            "rebuild it with `wina calibrate`")
    try:
        manifest = json.loads((p / MANIFEST).read_text())
        config = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"artifact '{p}' has a corrupt manifest or config", str(e),
                            "rebuild it with `wina calibrate`") from e
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"artifact '{p}' has format version {version!r}",
                            f"this wina reads format version {FORMAT_VERSION}",
                            "rebuild the artifact with this version of wina")
    if verify:
        verify_files(p, manifest, "artifact", "rebuild the artifact, or restore the file")
    return Artifact(p, manifest, config)


def verify_files(folder: Path, manifest: dict, what: str, fix: str) -> None:
    """Check every file a manifest lists (`files`: name -> sha256 and size) against the folder's contents."""
    for name, entry in manifest.get("files", {}).items():
        f = folder / name
        if not f.is_file():
            raise ArtifactError(f"{what} '{folder}' lacks '{name}' listed in its manifest",
                                "the folder was changed after it was written", fix)
        if f.stat().st_size != entry["bytes"] or sha256_file(f) != entry["sha256"]:
            raise ArtifactError(f"'{name}' in {what} '{folder}' does not match its checksum",
                                "the file was modified or truncated after it was written", fix)
