"""A trained run as one portable file (``tbps export RUN --out model.tbps``) and loading it without a registry.

The file is a safetensors file: the tensors are the selected model's weights (shared tensors stored once,
``safetensors.torch.save_model``) and the header's string metadata holds, as JSON, everything else a search
needs: the format name and version, the library version that wrote it, the method, the resolved config, the
tokenizer (its two files' text), the run's code fingerprint (when its metrics have one) and metrics, and a
SHA-256 of the weights (the key of the folder-gallery cache). Loading reads the header first and refuses a
file of another format, an unknown method or an incompatible library version with a message; nothing is
unpickled (safetensors and JSON only).

A loaded file builds the model from its config with the encoders' ``pretrained`` fields cleared: the weights
come from the file, so no pretrained folder (or symbolic backbone) is needed on the other machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tbps_lib.config import Config, checkpoint_config, config_from_dict, config_to_dict
from tbps_lib.data.text import CaptionTokenizer
from tbps_lib.utils import atomic_write

FORMAT = "tbps_lib.run"
FORMAT_VERSION = 1
#: The suffix ``tbps export`` suggests (any name loads).
SUFFIX = ".tbps"


class ExportError(ValueError):
    """A file that is not a loadable exported run (the message says why)."""


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 over the model's state (names, dtypes, shapes and bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return digest.hexdigest()


def _tokenizer_files(tokenizer: CaptionTokenizer) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = tokenizer.save(Path(tmp) / "tokenizer")
        return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.iterdir()) if p.is_file()}


def export_run(run: Any, out: str | os.PathLike) -> Path:
    """Write ``run`` (a finished :class:`~tbps_lib.engine.runs.Run`: selected weights, config, tokenizer,
    metrics) to the single file ``out``; returns its path."""
    from safetensors.torch import save_model

    from tbps_lib.engine.runs import library_version

    metrics = run.metrics  # refuses an unfinished run with a message
    model = run.model
    metadata = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "library_version": library_version(),
        "method": run.config.method, "name": run.name, "config": json.dumps(config_to_dict(run.config)),
        "tokenizer": json.dumps(_tokenizer_files(run.tokenizer)),
        "code_fingerprint": json.dumps(metrics.get("code_fingerprint")), "metrics": json.dumps(metrics),
        "weights_sha256": weights_digest(model)}
    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_model(model, str(tmp), metadata=metadata))  # copies to the CPU
    return path


def read_header(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of an exported run (the tensors are not read); :class:`ExportError` if it is none."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"exported model {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
        raise ExportError(f"{path} is not an exported tbps_lib run (not a safetensors file: {e})") from None
    if metadata.get("format") != FORMAT:
        raise ExportError(f"{path} is not an exported tbps_lib run (format {metadata.get('format')!r}, "
                          f"expected {FORMAT!r}; write one with `tbps export RUN --out model.tbps`)")
    return metadata


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def check_compatible(metadata: dict[str, str], path: Path) -> None:
    """Refuse a newer file format, another library ``major.minor`` version, or an unregistered method."""
    from tbps_lib.engine.runs import library_version
    from tbps_lib.models.registry import list_methods

    version = metadata.get("format_version", "?")
    if version != str(FORMAT_VERSION):
        raise ExportError(f"{path} has export format version {version}; this tbps_lib "
                          f"({library_version()}) reads version {FORMAT_VERSION}")
    written, here = metadata.get("library_version", "?"), library_version()
    if _major_minor(written) != _major_minor(here):
        raise ExportError(f"{path} was written by tbps_lib {written}; this is tbps_lib {here} (the major.minor "
                          f"versions must match: model code may have changed). Re-export it with tbps_lib {here}")
    method = metadata.get("method")
    if method not in list_methods():
        raise ExportError(f"{path} holds a model of method {method!r}, which this tbps_lib does not know; "
                          f"registered methods: {list_methods()}")


@dataclass
class ExportedRun:
    """A run loaded from an exported file: what a search needs (``model``, ``tokenizer``, ``config``) plus the
    run's ``metrics``, ``code_fingerprint`` and ``weights_sha256``. ``name`` is the original run's name."""

    path: Path
    config: Config
    model: torch.nn.Module
    tokenizer: CaptionTokenizer
    metrics: dict[str, Any]
    code_fingerprint: str | None
    weights_sha256: str
    name: str

    @property
    def method(self) -> str:
        return self.config.method


def load_exported(path: str | os.PathLike, device: str | torch.device | None = None) -> ExportedRun:
    """Load a file written by :func:`export_run` (no run registry or dataset needed)."""
    from safetensors.torch import load_model

    from tbps_lib.models.registry import build_model
    from tbps_lib.utils import select_device

    path = Path(path).expanduser()
    metadata = read_header(path)
    check_compatible(metadata, path)
    try:
        cfg = config_from_dict(json.loads(metadata["config"]))
        tokenizer_files = json.loads(metadata["tokenizer"])
        metrics = json.loads(metadata.get("metrics", "{}"))
        fingerprint = json.loads(metadata.get("code_fingerprint", "null"))
    except (KeyError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} has a damaged header ({type(e).__name__}: {e})") from None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, text in tokenizer_files.items():
            (folder / Path(name).name).write_text(text, encoding="utf-8")
        tokenizer = CaptionTokenizer.load(folder)
    # the weights come from the file: no pretrained folder or backbone is needed to build the model
    model = build_model(checkpoint_config(cfg, tokenizer.vocab_size))
    try:
        load_model(model, str(path), strict=True)
    except RuntimeError as e:
        raise ExportError(f"the weights in {path} do not fit the {cfg.method} model of this tbps_lib: {e}") from None
    model = model.to(select_device(device)).eval()
    return ExportedRun(path, cfg, model, tokenizer, metrics, fingerprint, metadata.get("weights_sha256", ""),
                       metadata.get("name", path.stem))


def is_exported_file(path: str | os.PathLike) -> bool:
    """True for an existing file (not a folder): what ``tbps search`` and the app treat as an exported run."""
    return Path(path).expanduser().is_file()


__all__ = ["FORMAT", "FORMAT_VERSION", "SUFFIX", "ExportError", "weights_digest", "export_run", "read_header",
           "check_compatible", "ExportedRun", "load_exported", "is_exported_file"]
