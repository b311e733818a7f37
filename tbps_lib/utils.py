"""Small helpers shared by the engine, the loaders and the CLI.

* :func:`progress` - a ``tqdm.auto`` bar that ``TBPS_PROGRESS=0`` turns off everywhere (CI, test logs).
* :func:`seed_everything` - seed Python, NumPy and torch in one call.
* :func:`select_device` - ``TBPS_DEVICE`` if set, else CUDA when present, else CPU.
* Atomic writes (:func:`atomic_write_text`, :func:`atomic_write_json`, :func:`atomic_torch_save`): write a
  temporary file in the target's folder, flush it to disk, then ``os.replace`` it over the target, so a
  reader never sees half a file and a crash never leaves a truncated checkpoint.
"""
from __future__ import annotations

import json
import os
import random
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

IGNORE_INDEX = -100
"""Label of positions no loss is computed on (``torch.nn.functional.cross_entropy``'s default ignore index):
the masked-token labels of ``data.text`` and the losses that read them share it."""

PROGRESS_ENV = "TBPS_PROGRESS"
DEVICE_ENV = "TBPS_DEVICE"


def cache_home() -> Path:
    """The workbook's cache folder: ``$TBPS_CACHE``, else ``~/.cache/tbps_lib`` (synthetic datasets, the
    folder-gallery embeddings of exported models)."""
    env = os.environ.get("TBPS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tbps_lib"


def progress_enabled() -> bool:
    """False when the environment variable ``TBPS_PROGRESS`` is ``0``/``false``/``no``/``off``."""
    return os.environ.get(PROGRESS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def progress(iterable: Iterable[Any] | None = None, enabled: bool = True, **kwargs: Any) -> Any:
    """A ``tqdm.auto`` progress bar (notebook widget or terminal), disabled by ``enabled=False`` or by
    ``TBPS_PROGRESS=0``. Extra keyword arguments go to tqdm (``total``, ``desc``, ``initial`` ...)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not (enabled and progress_enabled()), dynamic_ncols=True, **kwargs)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def select_device(requested: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``requested``, else ``TBPS_DEVICE``, else ``cuda`` when available, else CPU.

    Asking for CUDA on a machine without it is an error rather than a silent CPU run.
    """
    name = requested if requested is not None else os.environ.get(DEVICE_ENV, "").strip() or None
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        source = "argument" if requested is not None else DEVICE_ENV
        raise ValueError(f"device {str(device)!r} requested ({source}) but CUDA is not available here")
    return device


@contextmanager
def _atomic_target(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; on success move it over ``path`` atomically.

    The temporary name is unique per process and call, and the file is created with the usual umask
    permissions (unlike ``tempfile.mkstemp``'s owner-only mode), so run folders stay readable by others.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.touch(exist_ok=False)
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # make the bytes durable before the rename publishes them
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and then atomically move the temporary file to ``path``."""
    with _atomic_target(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically (load it back with ``torch.load(..., weights_only=True)``)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write ``rows`` as JSON lines to ``path`` atomically (the per-epoch training log is rewritten whole,
    so it always matches the checkpoint it came from)."""
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file; a malformed line is an error naming the file and line number."""
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {i} is not valid JSON ({e})") from e
    return rows
