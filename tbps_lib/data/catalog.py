"""The one entry point to a dataset: :func:`load_dataset` by name, folder or synthetic preset.

It sits above the readers (``tbps_lib.data.formats``) and the generator (``tbps_lib.data.synthetic``), so
neither imports the other's module back: ``synthetic:<preset>`` is generated into the cache on first use
here, then read by ``formats.read_synthetic``.
"""
from __future__ import annotations

from pathlib import Path

from tbps_lib.data.formats import READERS, DatasetError, TBPSDataset, detect_format, read_synthetic


def load_dataset(spec: str, root: str | Path | None = None, strict: bool = True,
                 check_images: bool = True) -> TBPSDataset:
    """Load a dataset by name or path.

    ``spec`` is one of ``cuhk-pedes``, ``icfg-pedes``, ``rstpreid`` (with ``root``), ``synthetic`` (with
    ``root``), ``synthetic:<preset>`` (generated into the cache on first use), or a folder path whose
    format is detected from its annotation file.
    """
    if spec.startswith("synthetic:"):
        from tbps_lib.data import synthetic  # local import: the generator pulls in Pillow drawing code

        return read_synthetic(synthetic.ensure_synthetic(spec.split(":", 1)[1]), strict, check_images)
    if spec in READERS:
        if root is None:
            raise DatasetError(f"dataset {spec!r} needs a root folder (e.g. --root /data/{spec})")
        return READERS[spec](root, strict=strict, check_images=check_images)
    path = Path(spec).expanduser()
    if path.is_dir():
        return READERS[detect_format(path)](path, strict=strict, check_images=check_images)
    raise DatasetError(
        f"unknown dataset {spec!r}: use one of {sorted(READERS)}, 'synthetic:<preset>', or a folder path"
    )


__all__ = ["load_dataset"]
