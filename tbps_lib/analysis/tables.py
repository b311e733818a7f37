"""Paper tables: the reported numbers of :mod:`tbps_lib.reported` as the papers print them, and the
workbook's own numbers beside them.

:func:`paper_table` lays out one table's reported numbers. :func:`reproduction_table` sets, for every row
and dataset of the same table, the number the workbook measured next to the reported one, with the
difference, where it comes from, and (for the steps listed in :data:`STEPS`) whether the workbook moves
in the same direction as the paper. It only *reads* the run registry: it never trains. Evaluating a
finished run is allowed (re-ranked and cross-domain rows are evaluated from the run's cached embeddings).

Row -> run
----------
Each reported row is turned into a config by :func:`plan_row`:

* ``config`` flags ``method=<paper id>`` (the paper's own rows in comparison tables): the method's default
  config. ``rerank=1`` ("+R") evaluates that run re-ranked with :data:`RERANK` (NAFS-style visual
  neighbours, as the papers describe it); ``image_pretrain=clip`` ("+C") is not reproducible: the workbook
  has no CLIP weights and downloads nothing.
* other ``config`` flags (ablation rows): ``MethodSpec.paper_rows(flags, preset)`` of the registered method
  named like the paper gives the dotted config changes, or raises ``NotReproducible(reason)``. The flags
  above (``method``, ``rerank``, ``image_pretrain``) are handled here and never passed to ``paper_rows``.
* no ``config`` (another paper's method): rows whose label names a method the workbook implements
  (:data:`WORKBOOK_LABELS`, e.g. ``CMPM+CMPC`` is the workbook's baseline, ``DSSL+R`` the dssl method
  re-ranked) use that method's default config; every other row is "not implemented". So are the few rows
  that carry ablation flags but belong to another method (:data:`OTHER_METHOD_ROWS`, ACSA's TIPCB rows).
* a method that is not registered, or has no ``paper_rows`` for an ablation row: "not implemented".

Datasets
--------
The papers' datasets map to the workbook's by preset: in ``smoke`` to the synthetic presets
(:data:`SMOKE_DATA`), in ``paper`` to the real datasets (:data:`PAPER_DATA`), whose folders come from the
``roots`` argument or the environment variables of :data:`ROOT_ENV` (``TBPS_CUHK_PEDES_ROOT``,
``TBPS_ICFG_PEDES_ROOT``, ``TBPS_RSTPREID_ROOT``); a real dataset without a folder makes its rows "not
reproducible" with that reason. A cross-domain column ``A->B`` (Sew Table 6) trains on A and evaluates
the A-run on B's test split.

Statuses (column ``status``)
----------------------------
``measured``, ``not run yet`` (the config is known but its run is not in the registry; column ``train``
holds the command that trains it), ``not implemented``, ``not reproducible`` (column ``reason`` says why).
No number is ever filled in for a row that was not measured.

Sign agreement
--------------
:data:`STEPS` lists, per table, explicit comparison pairs ``(from row, to row, what changes)`` by the rows'
printed order: for an ablation table, each component the paper adds or swaps, measured against the row
the paper compares it with (e.g. Sew Table 4: Model 2, the ViT baseline, against Models 3-5; Model 6
against Models 4 and 5); for comparison tables, the paper's own "+R" row against its plain row. A step
*agrees* when the workbook's change of :data:`SIGN_METRIC` (R1) has the same sign as the paper's *and*
is larger than its noise; otherwise it is *within noise* (:func:`step_result`):

* ``ours Δ`` is the mean paired difference over the seeds both rows were measured with,
  d_s = to_s - from_s (same seed s), and ``noise`` = :data:`NOISE_SE` (2) standard errors of it,
  2 * sd(d) / sqrt(n). The rule: ``agree`` / ``disagree`` only when |mean d| > noise, else
  ``within noise``; a change of exactly zero is therefore never ``disagree``.
* fewer than two paired seeds give no noise estimate: ``too few seeds`` (not counted).
* a step with a row not measured, that the paper prints as no change (or leaves blank), or whose two rows
  resolve to the same runs is not counted (:data:`UNCOUNTED`).
* several steps can stand for the same pair of runs (e.g. "+ MCM" in Sew Tables 4, 5 and 6 on one dataset);
  :func:`all_steps` marks every repetition of a pair within a paper (column ``repeat``) and
  :func:`sign_summary` counts each pair once.

Seeds
-----
Each row is trained for seeds 0..n-1 (config field ``seed``; n = :class:`RunLookup` ``seeds``,
:data:`DEFAULT_SEEDS` = 3). ``<m> ours`` is the mean over the seeds found, ``<m> sd`` their standard
deviation (NaN for one seed), ``seeds`` says how many were found ("2/3"), ``<m> by seed`` holds the values
per seed (NaN where missing). A row with at least one seed is ``measured``.

Evaluation-only variants
------------------------
:attr:`RowPlan.rerank` names how a run is evaluated, one of :data:`RERANK_VARIANTS` (None, visual
neighbours, k-reciprocal in the released code's or the paper's form, the method's two-stage ``rescore``);
the name is passed to ``Run.evaluate(rerank=...)`` and recorded in the row's ``rerank`` column.
"""
from __future__ import annotations

import math
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping

import pandas as pd

from tbps_lib.config import DEFAULT_SEEDS
from tbps_lib.engine.metrics import METRIC_NAMES
from tbps_lib.reported import (DATASETS, METRICS, PAPERS, MissingTableError, available_tables, load_reported,
                               parse_config, table_info)

if TYPE_CHECKING:  # pragma: no cover
    from tbps_lib.config import Config
    from tbps_lib.data.formats import TBPSDataset
    from tbps_lib.engine.runs import Run

STATUSES = ("measured", "not run yet", "not implemented", "not reproducible")
SMOKE_DATA = {"CUHK-PEDES": "synthetic:cuhk-like", "ICFG-PEDES": "synthetic:icfg-like",
              "RSTPReid": "synthetic:rstp-like"}
"""Paper dataset -> the synthetic preset that stands in for it in the smoke preset."""
PAPER_DATA = {"CUHK-PEDES": "cuhk-pedes", "ICFG-PEDES": "icfg-pedes", "RSTPReid": "rstpreid"}
"""Paper dataset -> the reader of the real dataset (paper preset)."""
ROOT_ENV = {"CUHK-PEDES": "TBPS_CUHK_PEDES_ROOT", "ICFG-PEDES": "TBPS_ICFG_PEDES_ROOT",
            "RSTPReid": "TBPS_RSTPREID_ROOT"}
"""Paper dataset -> the environment variable naming its folder (paper preset)."""
RERANK = "visual_neighbors"
"""The re-ranking of "+R" rows: NAFS-style visual neighbours, as the papers describe it."""
RERANK_VARIANTS = (None, "visual_neighbors", "k_reciprocal", "k_reciprocal_paper", "rescore")
"""Evaluation-only row variants (:attr:`RowPlan.rerank`), passed as ``rerank=`` to ``Run.evaluate``."""
NOISE_SE = 2.0
"""The noise band of a step: this many standard errors of the paired (same-seed) difference."""
SIGN_METRIC = "R1"
COUNTED = ("agree", "disagree", "within noise")
"""The three results a measured step can have (see :func:`step_result`)."""
UNCOUNTED = ("not measured", "too few seeds", "same run", "paper: no change", "paper: not reported")
"""Results of a step that is none of :data:`COUNTED` (see :func:`step_result`)."""
STEP_COLUMNS = ("paper", "table", "from", "to", "to_order", "what", "dataset", "metric", "paper Δ", "ours Δ",
                "noise", "n", "result", "pair")
NON_CONFIG_FLAGS = ("method", "rerank", "image_pretrain")
"""Row flags that are not config changes: handled by :func:`plan_row`, never passed to ``paper_rows``."""
WORKBOOK_LABELS = {"CMPM+CMPC": "baseline", "CMPM/C": "baseline", "DSSL": "dssl", "ACSA": "acsa",
                   "LAIP": "laip"}
"""Labels of other papers' rows (citation and variant suffix removed) that name a workbook method."""
OTHER_METHOD_ROWS = {("acsa", "VI"): {1: "TIPCB", 2: "TIPCB"}}
"""Rows that carry ablation flags but belong to another paper's method: (paper, table) -> {order: name}."""

# (from row, to row, what changes), by printed row order; see "Sign agreement" in the module docstring.
STEPS: dict[tuple[str, str], tuple[tuple[int, int, str], ...]] = {
    ("sew_mcm", "1"): ((27, 28, "re-ranking"), (29, 30, "re-ranking (CLIP)")),
    ("sew_mcm", "2"): ((10, 11, "re-ranking"), (12, 13, "re-ranking (CLIP)")),
    ("sew_mcm", "3"): ((8, 9, "re-ranking"), (10, 11, "re-ranking (CLIP)")),
    ("sew_mcm", "4"): ((1, 2, "ResNet-50 -> ViT-B/16"), (2, 3, "+ Sew, fixed margin"),
                       (2, 4, "+ Sew, adaptive margin"), (3, 4, "fixed -> adaptive margin"), (2, 5, "+ MCM"),
                       (4, 6, "+ MCM on Sew-A"), (5, 6, "+ Sew-A on MCM")),
    ("sew_mcm", "5"): ((1, 3, "+ caption modelling on mask"), (3, 4, "+ attention"),
                       (2, 4, "+ mask and caption modelling on attention")),
    ("sew_mcm", "6"): ((1, 2, "+ MCM"),),
    ("part_level", "2"): ((1, 2, "+ coarse"), (2, 3, "+ fine"), (3, 4, "+ CMR")),
    ("part_level", "3"): ((1, 2, "CMR on fine only"),),
    ("part_level", "4"): ((1, 2, "separated -> shared decoder"),),
    ("part_level", "5"): ((1, 2, "RN50 -> ViT-B/16"), (2, 4, "ViT-B/16 -> CLIP")),
    ("part_level", "S2"): ((1, 2, "2 -> 4 coarse embeddings"), (2, 3, "4 -> 6 coarse embeddings")),
    ("acsa", "I"): ((19, 20, "re-ranking"),),
    ("acsa", "III"): ((1, 2, "Bi-LSTM -> BERT (ResNet50)"), (3, 4, "Bi-LSTM -> BERT (ViT)"),
                      (5, 6, "Bi-LSTM -> BERT (Swin)"), (1, 3, "ResNet50 -> ViT (Bi-LSTM)"),
                      (2, 4, "ResNet50 -> ViT (BERT)"), (3, 5, "ViT -> Swin (Bi-LSTM)"),
                      (4, 6, "ViT -> Swin (BERT)")),
    ("acsa", "IV"): ((1, 2, "six slices -> partition"),),
    ("acsa", "V"): ((1, 2, "+ relation II"), (2, 4, "+ relation III"), (4, 3, "+ relation IV")),
    ("acsa", "VI"): ((3, 4, "BERT -> XLNet"),),
    ("laip", "IV"): ((1, 2, "+ COCO pre-finetuning"), (2, 3, "+ ForAtt"), (2, 4, "+ BackAtt"),
                     (2, 5, "+ BidirAtt"), (2, 6, "+ MPM"), (5, 7, "+ MPM on BidirAtt"),
                     (6, 7, "+ BidirAtt on MPM"), (7, 8, "+ fusion triplet loss")),
    ("laip", "VI"): ((1, 2, "+ COCO (baseline)"), (3, 4, "+ COCO (LAIP)"), (1, 3, "+ LAIP modules, no COCO"),
                     (2, 4, "+ LAIP modules, with COCO")),
    ("dssl", "1"): ((1, 2, "baseline -> AlignI"), (1, 3, "baseline -> AlignII"), (1, 4, "baseline -> AlignIII"),
                    (1, 5, "baseline -> AlignIV"), (1, 6, "baseline -> AlignV"), (2, 7, "+ AlignII on AlignI"),
                    (2, 8, "+ AlignIII on AlignI"), (3, 9, "+ AlignIII on AlignII"),
                    (7, 10, "+ AlignIII on AlignI+II"), (2, 11, "+ AlignIV+V on AlignI"),
                    (10, 12, "+ AlignIV+V on AlignI+II+III")),
    ("dssl", "2"): ((1, 2, "+ SPSM+SPFM"), (2, 3, "+ MEC"), (4, 3, "+ SAM"), (5, 3, "+ SDM")),
    ("dssl", "3"): ((1, 2, "addition -> concatenation"),),
    ("dssl", "4"): ((1, 2, "r 0 -> 0.25"), (2, 3, "r 0.25 -> 0.5"), (3, 4, "r 0.5 -> 0.75"),
                    (4, 5, "r 0.75 -> 0.9")),
    ("dssl", "5"): ((1, 2, "Euclidean -> ranking loss"),),
    ("dssl", "6"): ((16, 18, "re-ranking"),),
}
_VARIANT_SUFFIX = re.compile(r"(\s*\+\s*(RVN|RR|R|C))+$")
_CITATION = re.compile(r"\s*\([^)]*\)$")


# ----------------------------------------------------------------------------------------------------
# Reported numbers, laid out as printed


def _row_index(rows: pd.DataFrame) -> pd.Index:
    """Row labels in paper order; the backbone joins the label where the table prints backbones."""
    if rows["backbone"].ne("").any():
        return pd.MultiIndex.from_frame(rows[["row", "backbone"]])
    return pd.Index(rows["row"], name="row")


def _join_notes(notes: pd.Series) -> str:
    """One text from a row's cell notes, each distinct clause once (a row note repeats on every cell)."""
    clauses = (c for note in notes for c in note.split("; "))
    return "; ".join(dict.fromkeys(clauses))


def _column_order(long: pd.DataFrame) -> list[tuple[str, str]]:
    """(dataset, metric) pairs: datasets in the order the table first uses them, metrics R1..mINP, Rsum."""
    datasets = list(dict.fromkeys(long.sort_values("order", kind="stable")["dataset"]))
    present = set(zip(long["dataset"], long["metric"]))
    return [(d, m) for d in datasets for m in METRICS if (d, m) in present]


def _reported_table(paper: str, table: str | int) -> tuple[dict[str, str], pd.DataFrame]:
    """The catalogue entry and the long-format reported numbers of a table that is in the paper text."""
    info = table_info(paper, table)
    if info["status"] == "missing":
        raise MissingTableError(f"{paper} Table {info['table']} is not in the paper text: {info['reason']}")
    return info, load_reported(paper, info["table"])


def paper_table(paper: str, table: str | int) -> pd.DataFrame:
    """Reported numbers of one paper table: rows in paper order, columns (dataset, metric).

    Cells the paper leaves blank ("-") or that could not be read are NaN. ``attrs`` carries the
    table's caption, kind, page and the notes of each row (row label -> note text). An unknown paper
    or table is a ValueError listing the available ones; a table whose numbers are not in the paper
    text raises :class:`tbps_lib.reported.MissingTableError` with the reason.
    """
    info, long = _reported_table(paper, table)
    rows = long.sort_values("order", kind="stable").drop_duplicates("order")
    wide = long.pivot(index="order", columns=["dataset", "metric"], values="value")
    wide = wide.reindex(index=rows["order"], columns=pd.MultiIndex.from_tuples(_column_order(long),
                                                                               names=["dataset", "metric"]))
    wide.index = _row_index(rows)
    if not wide.index.is_unique:
        raise ValueError(f"{paper} Table {info['table']}: row labels are not unique: "
                         f"{wide.index[wide.index.duplicated()].tolist()}")
    notes = long[long["note"] != ""].groupby("order", sort=True)["note"].agg(_join_notes)
    labels = dict(zip(rows["order"], wide.index))
    wide.attrs = {"paper": paper, "table": info["table"], "caption": info["caption"], "kind": info["kind"],
                  "page": info["page"], "status": info["status"], "reason": info["reason"],
                  "notes": {labels[o]: text for o, text in notes.items()}}
    return wide


def _table_title(paper: str, info: Mapping[str, str]) -> str:
    page = f", p. {info['page']}" if info.get("page") else ""
    return f"{paper} Table {info['table']} ({info['kind']}{page}): {info['caption']}"


def paper_tables_text(paper: str) -> str:
    """Every table of ``paper`` as text: title, the reported numbers as printed ("-" = blank in the
    paper), the row notes, and for a table whose numbers are not in the paper text, the reason."""
    blocks = []
    for table in available_tables(paper):
        info = table_info(paper, table)
        lines = [_table_title(paper, info)]
        if info["status"] == "missing":
            lines.append(f"  not in the paper text: {info['reason']}")
        else:
            wide = paper_table(paper, table)
            lines.append(wide.to_string(float_format=lambda v: f"{v:.2f}", na_rep="-"))
            lines += [f"  note [{label if isinstance(label, str) else ' / '.join(label)}]: {text}"
                      for label, text in wide.attrs["notes"].items()]
            if info["status"] == "partial":
                lines.append(f"  partial: {info['reason']}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# ----------------------------------------------------------------------------------------------------
# Rows -> configs -> runs


@dataclass(frozen=True)
class RowPlan:
    """How one reported row is reproduced: ``method`` with config ``changes``, evaluated with the
    evaluation-only variant ``rerank`` (one of :data:`RERANK_VARIANTS`; None = plain ranking), or why it is
    not (``status`` is then ``not implemented`` / ``not reproducible``)."""

    status: str = ""
    reason: str = ""
    method: str | None = None
    changes: Mapping[str, Any] = field(default_factory=dict)
    rerank: str | None = None

    def __post_init__(self) -> None:
        if self.rerank not in RERANK_VARIANTS:
            raise ValueError(f"RowPlan.rerank must be one of {RERANK_VARIANTS}, got {self.rerank!r}")


def _label_method(label: str) -> str | None:
    """The workbook method a row label of another paper names (:data:`WORKBOOK_LABELS`), if any."""
    base = _CITATION.sub("", _VARIANT_SUFFIX.sub("", label.strip())).strip()
    return WORKBOOK_LABELS.get(base)


def _rerank_flag(value: str) -> str | None:
    """The variant a row's ``rerank`` flag names: ``1`` -> :data:`RERANK`, ``0`` / empty -> None, or a name
    of :data:`RERANK_VARIANTS` as is."""
    if value in ("", "0"):
        return None
    if value == "1":
        return RERANK
    if value not in RERANK_VARIANTS:
        raise ValueError(f"rerank flag {value!r}: expected 0, 1 or one of {RERANK_VARIANTS[1:]}")
    return value


def plan_row(paper: str, table: str, order: int, label: str, variant: str, config: str,
             preset: str = "smoke") -> RowPlan:
    """The reproduction plan of one reported row (see "Row -> run" in the module docstring)."""
    from tbps_lib.models.registry import NotReproducible, list_methods, method_spec

    other = OTHER_METHOD_ROWS.get((paper, str(table)), {}).get(order)
    if other:
        return RowPlan("not implemented", f"another paper's method ({other})")
    flags = parse_config(config)
    if not flags:
        method = _label_method(label)
        if method is None:
            return RowPlan("not implemented", "another paper's method")
        flags = {"method": method, "rerank": "1" if "+R" in variant else "0",
                 "image_pretrain": "clip" if "+C" in variant else ""}
    method = flags.get("method", paper)
    default = "method" in flags
    rerank = _rerank_flag(flags.get("rerank", ""))
    if flags.get("image_pretrain") == "clip":
        return RowPlan("not reproducible", "a CLIP-pretrained image encoder (+C): the workbook has no local CLIP "
                                           "weights and downloads nothing", method, rerank=rerank)
    if method not in list_methods():
        return RowPlan("not implemented", f"method {method!r} is not in the workbook yet", method, rerank=rerank)
    if default:
        return RowPlan("", "", method, {}, rerank)
    spec = method_spec(method)
    if spec.paper_rows is None:
        return RowPlan("not implemented", f"method {method!r} does not map its paper's table rows to configs "
                                          "(MethodSpec.paper_rows)", method, rerank=rerank)
    ablation = {k: v for k, v in flags.items() if k not in NON_CONFIG_FLAGS}
    try:
        changes = dict(spec.paper_rows(ablation, preset))
    except NotReproducible as e:
        return RowPlan("not reproducible", str(e), method, rerank=rerank)
    return RowPlan("", "", method, changes, rerank)


def _cli_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value)
    return str(value)


def train_command(method: str, preset: str, dataset: str, root: str | None,
                  changes: Mapping[str, Any]) -> str:
    """The ``tbps train`` command line that trains the run of a config."""
    args = ["tbps", "train", "--method", method, "--preset", preset, "--dataset", dataset]
    if root:
        args += ["--set", f"data.root={root}"]
    for key, value in changes.items():
        args += ["--set", f"{key}={_cli_value(value)}"]
    return shlex.join(args)


class RunLookup:
    """Finds the finished runs of configs without training, for one preset and run registry.

    Caches what is slow to repeat across the rows and tables of one report: prepared datasets (keyed by
    dataset spec, root, validation hold-out and seed), found runs, and re-ranked / cross-domain evaluations.
    ``roots`` maps paper dataset names to folders (paper preset; default: :data:`ROOT_ENV` variables);
    ``sources`` overrides the workbook dataset spec of a paper dataset (e.g. ``{"CUHK-PEDES": "/data/x"}``).
    ``seeds``: each row is looked up for seeds 0..seeds-1 (config field ``seed``); ``changes``: dotted
    config changes applied to every row before its own (e.g. a notebook budget's fewer epochs,
    :attr:`tbps_lib.config.NotebookParams.changes`). A dataset file is read once per (spec, root);
    only the seed-dependent validation hold-out is redone per seed, so more seeds stay cheap to look up.
    """

    def __init__(self, preset: str = "smoke", runs_dir: str | os.PathLike | None = None,
                 roots: Mapping[str, str] | None = None, sources: Mapping[str, str] | None = None,
                 device: str | None = None, seeds: int = DEFAULT_SEEDS,
                 changes: Mapping[str, Any] | None = None) -> None:
        from tbps_lib.config import PRESETS

        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; presets: {list(PRESETS)}")
        if int(seeds) < 1:
            raise ValueError(f"RunLookup: seeds must be >= 1, got {seeds}")
        if "seed" in (changes or {}):
            raise ValueError("RunLookup: changes may not set 'seed'; use seeds= (rows run seeds 0..seeds-1)")
        self.seeds, self.changes = int(seeds), dict(changes or {})
        unknown = sorted(set(roots or {}) - set(DATASETS)) + sorted(set(sources or {}) - set(DATASETS))
        if unknown:
            raise ValueError(f"unknown paper dataset(s) {unknown}; expected names from {list(DATASETS)}")
        self.preset, self.runs_dir, self.device = preset, runs_dir, device
        self.roots, self.sources = dict(roots or {}), dict(sources or {})
        self._datasets: dict[tuple, TBPSDataset] = {}
        self._loaded: dict[tuple, TBPSDataset] = {}
        self._runs: dict[str, Run | None] = {}
        self._evals: dict[tuple, dict[str, float]] = {}

    def source(self, name: str) -> tuple[str, str | None]:
        """(dataset spec, root) of a paper dataset in this preset; NotReproducible when a real dataset's
        folder is not given."""
        from tbps_lib.models.registry import NotReproducible

        if name not in DATASETS:
            raise ValueError(f"unknown paper dataset {name!r}; expected one of {list(DATASETS)}")
        root = self.roots.get(name)
        if root is None and self.preset == "paper":
            root = os.environ.get(ROOT_ENV[name]) or None
        if name in self.sources:
            return self.sources[name], root
        if self.preset == "smoke":
            return SMOKE_DATA[name], None
        if not root:
            raise NotReproducible(f"{name} is not available here: set {ROOT_ENV[name]} to its folder "
                                  "(or pass roots=)")
        return PAPER_DATA[name], root

    def prepare(self, cfg: Config) -> TBPSDataset:
        """``prepare_dataset(cfg)``, once per (dataset, root, validation hold-out, seed); the dataset itself
        is loaded once per (dataset, root)."""
        from tbps_lib.data.catalog import load_dataset
        from tbps_lib.data.loaders import prepare_dataset

        key = (cfg.data.dataset, cfg.data.root, cfg.data.val_holdout, cfg.seed)
        if key not in self._datasets:
            source = (cfg.data.dataset, cfg.data.root)
            if source not in self._loaded:
                self._loaded[source] = load_dataset(cfg.data.dataset, root=cfg.data.root)
            self._datasets[key] = prepare_dataset(cfg, loaded=self._loaded[source])
        return self._datasets[key]

    def find(self, cfg: Config) -> Run | None:
        """The finished run of ``cfg`` or None (:func:`tbps_lib.engine.runs.find_run`), cached."""
        from tbps_lib.config import config_hash
        from tbps_lib.engine.runs import find_run

        key = config_hash(cfg)
        if key not in self._runs:
            self._runs[key] = find_run(cfg, self.runs_dir, load=self.prepare, device=self.device)
        return self._runs[key]

    def test_metrics(self, run: Run, rerank: str | None = None, test: tuple[str, str | None] | None = None
                     ) -> dict[str, float]:
        """Test metrics of a run: the recorded ones (``metrics.json``), or evaluated re-ranked and/or on
        another dataset's test split ``test`` = (spec, root), from the run's cached embeddings."""
        if rerank is None and test is None:
            found = run.metrics["test"]
        else:
            key = (str(run.dir), rerank, test)
            if key not in self._evals:
                dataset, root = test if test is not None else (None, None)
                self._evals[key] = run.evaluate("test", rerank=rerank, dataset=dataset, root=root)
            found = self._evals[key]
        # numbers only: a re-ranked result also names its re-ranking, which the row's ``rerank`` column holds
        return {k: float(v) for k, v in found.items() if k in METRIC_NAMES}


def encoder_init(run: Run | None, cfg: Config) -> str:
    """``image/text`` initialisation: ``random`` or ``pretrained`` (the run's record when there is one)."""
    init = run.metrics.get("init", {}) if run is not None else {
        "image": "pretrained" if cfg.image.pretrained else "random",
        "text": "pretrained" if cfg.text.pretrained else "random"}
    return "/".join(str(init.get(k, "?")).split(":")[0] for k in ("image", "text"))


def row_config(plan: RowPlan, dataset: str, lookup: RunLookup, seed: int = 0
               ) -> tuple[Config, tuple[str, str | None] | None]:
    """(config of the run, test dataset (spec, root) or None) of a runnable planned row on one paper dataset
    for one ``seed`` (``A->B``: the run trains on A and is tested on B); NotReproducible when a dataset is
    not available. The lookup's ``changes`` come first, the row's own changes override them."""
    from tbps_lib.config import make_config

    names = dataset.split("->")
    (spec, root), test = lookup.source(names[0]), (lookup.source(names[1]) if len(names) == 2 else None)
    changes = {**lookup.changes, **plan.changes, **({"data.root": root} if root else {}),
               **({"seed": seed} if seed else {})}
    return make_config(plan.method, lookup.preset, spec, changes), test


def _row_changes(plan: RowPlan, lookup: RunLookup, seed: int) -> dict[str, Any]:
    """The ``--set`` changes of a row's training command (see :func:`row_config`)."""
    return {**lookup.changes, **plan.changes, **({"seed": seed} if seed else {})}


def table_configs(paper: str, table: str | int, preset: str = "smoke", lookup: RunLookup | None = None
                  ) -> pd.DataFrame:
    """The runs a paper table needs: one line per runnable (row, paper dataset, seed) with ``order``, ``row``,
    ``dataset`` (the paper's), ``seed`` (0..lookup.seeds-1), ``method``, ``config`` (the
    :class:`~tbps_lib.config.Config` to train) and ``hash`` (its config hash; rows sharing a run share it).
    Rows that are not implemented or not reproducible in this preset are left out. This plans only;
    training is the caller's (``train_or_load(config)`` per distinct hash), so analysis never trains."""
    from tbps_lib.config import config_hash
    from tbps_lib.models.registry import NotReproducible

    lookup = lookup or RunLookup(preset)
    info, long = _reported_table(paper, table)
    first = long.sort_values("order", kind="stable").drop_duplicates("order").set_index("order")
    lines = []
    for name in dict.fromkeys(long.sort_values("order", kind="stable")["dataset"]):
        for order in sorted(set(long.loc[long["dataset"] == name, "order"])):
            r = first.loc[order]
            plan = plan_row(paper, info["table"], order, r["row"], r["variant"], r["config"], preset)
            if plan.status:
                continue
            for seed in range(lookup.seeds):
                try:
                    cfg, _ = row_config(plan, name, lookup, seed)
                except NotReproducible:
                    break
                lines.append({"order": order, "row": r["row"], "dataset": name, "seed": seed, "method": plan.method,
                              "config": cfg, "hash": config_hash(cfg)})
    return pd.DataFrame(lines, columns=["order", "row", "dataset", "seed", "method", "config", "hash"])


def trained_tables(method: str, budget: str) -> dict[str, tuple[str, ...] | None]:
    """What ``method``'s notebook trains under ``budget``: ``{table: row labels, or None for every row}``
    (``MethodSpec.trained_tables`` of the budget's :attr:`~tbps_lib.config.Budget.table_budget`; empty when
    the method declares nothing for it)."""
    from tbps_lib.config import BUDGETS
    from tbps_lib.models.registry import method_spec

    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; budgets: {list(BUDGETS)}")
    return dict(method_spec(method).trained_tables.get(BUDGETS[budget].table_budget, {}))


def plan_tables(paper: str, tables: Iterable[str] | Mapping[str, tuple[str, ...] | None], preset: str = "smoke",
                lookup: RunLookup | None = None) -> pd.DataFrame:
    """:func:`table_configs` of several tables of one paper, one frame with a ``table`` column. ``tables``:
    table names, or ``{table: row labels or None}`` (:func:`trained_tables`) to keep only those rows; a
    label that is no row of its table is an error. A name ``"2@CUHK-PEDES"`` keeps only that paper dataset's
    column of Table 2."""
    chosen = dict(tables) if isinstance(tables, Mapping) else {str(t): None for t in tables}
    frames = []
    for key, rows in chosen.items():
        table, _, dataset = str(key).partition("@")
        frame = table_configs(paper, table, preset, lookup).assign(table=table)
        if dataset:
            if dataset not in set(frame["dataset"]) and dataset not in DATASETS:
                raise ValueError(f"{paper} table {table}: unknown dataset {dataset!r} in {key!r}")
            frame = frame[frame["dataset"] == dataset]
        if rows is not None:
            known = set(paper_table_rows(paper, table))
            unknown = sorted(set(rows) - known)
            if unknown:
                raise ValueError(f"{paper} table {table}: no row(s) {unknown}; rows: {sorted(known)}")
            frame = frame[frame["row"].isin(rows)]
        frames.append(frame)
    columns = ["table", "order", "row", "dataset", "seed", "method", "config", "hash"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def paper_table_rows(paper: str, table: str | int) -> list[str]:
    """The row labels of a reported table, in the paper's order."""
    _, long = _reported_table(paper, table)
    return list(dict.fromkeys(long.sort_values("order", kind="stable")["row"]))


def notebook_extras(method: str, budget: str, mode: str) -> dict[str, dict[str, Any]]:
    """The runs a method's notebook trains besides its tables, as ``{label: config changes}`` over its
    default run (seed 0; ``reproduce_plan`` adds the budget's ``default_changes``): in smoke mode, notebook
    02's random-init baseline (``pretrain.RANDOM_INIT``) and, in the ``full`` and ``all`` budgets, notebook
    06's Table V / Figure 6 variants of LAIP (``analysis.laip_figures.SWEEPS``). They live with the analysis,
    not the registry, because they decide which runs a notebook shows, not what a run computes (a change here
    leaves every run's code fingerprint as it is)."""
    from tbps_lib.pretrain import RANDOM_INIT

    if mode != "smoke":
        return {}
    if method == "baseline":
        return {"random init": dict(RANDOM_INIT)}
    if method == "laip" and budget in ("full", "all"):
        from tbps_lib.analysis.laip_figures import SWEEPS

        return {label: dict(changes) for label, changes in SWEEPS.items() if changes}  # {}: the default run
    return {}


def reproduce_plan(methods: Iterable[str], params: Any) -> pd.DataFrame:
    """Every run the notebooks of ``methods`` train under ``params`` (a
    :class:`~tbps_lib.config.NotebookParams`): each method's default run on ``params.data`` (table
    ``default``: the run notebooks 00-02 and 12 load, with the budget's ``default_changes``), the
    notebooks' single-seed variants of it (table ``extra``, :func:`notebook_extras`), the same
    with the budget's changes where they differ (table ``figures``: the runs notebooks 09-11 load,
    ``analysis.figures.load_runs``; in the ``ci`` budget) and, in smoke mode, the rows of its
    :func:`trained_tables` for ``params.budget`` with seeds 0..params.seeds-1 (in paper mode only
    under a budget whose changes apply there: ``check``). ``tbps reproduce`` trains
    them all before the notebooks run, so the notebooks only load."""
    from tbps_lib.config import config_hash, make_config

    lookup = RunLookup(params.mode, params.runs, seeds=params.seeds, changes=params.changes)
    frames = []
    for method in methods:
        defaults = {"default": make_config(method, params.mode, dataset=params.data, changes=params.default_changes)}
        if params.changes != params.default_changes:
            defaults["figures"] = make_config(method, params.mode, params.data, params.changes)
        extras = {label: make_config(method, params.mode, params.data, {**params.default_changes, **changes})
                  for label, changes in notebook_extras(method, params.budget, params.mode).items()}
        frames.append(pd.DataFrame([{"table": table, "order": 0, "row": row, "dataset": params.data,
                                     "seed": cfg.seed, "method": method, "config": cfg, "hash": config_hash(cfg)}
                                    for table, row, cfg in [*((t, "default", c) for t, c in defaults.items()),
                                                            *(("extra", r, c) for r, c in extras.items())]]))
        if params.mode == "smoke" or params.train_changes:
            frames.append(plan_tables(method, trained_tables(method, params.budget), params.mode, lookup))
    return pd.concat(frames, ignore_index=True)


def measure_row(plan: RowPlan, dataset: str, lookup: RunLookup) -> dict[str, Any]:
    """Status, measured metrics and provenance of one planned row on one paper dataset (``A->B``:
    train on A, test on B), over the seeds 0..lookup.seeds-1.

    ``metrics`` are the means over the seeds found, ``sd`` their standard deviations (NaN for one seed),
    ``by_seed`` one metrics dict per seed (empty where the run is missing), ``runs`` the config hash of
    each seed's run ("" where missing), ``seeds`` "found/asked"; ``train`` holds the commands of the
    missing seeds' runs."""
    from tbps_lib.config import config_hash
    from tbps_lib.models.registry import NotReproducible

    out: dict[str, Any] = {"status": plan.status, "reason": plan.reason, "metrics": {}, "sd": {}, "by_seed": [],
                           "runs": (), "seeds": "", "data": "", "backbones": "", "init": "", "config": "",
                           "rerank": plan.rerank or "", "train": "", "stale": ""}
    if plan.status:
        return out
    found: list[tuple[int, Run, Config]] = []
    missing: list[str] = []
    for seed in range(lookup.seeds):
        try:
            cfg, test = row_config(plan, dataset, lookup, seed)
        except NotReproducible as e:
            return {**out, "status": "not reproducible", "reason": str(e)}
        run = lookup.find(cfg)
        if run is None:
            missing.append(train_command(plan.method, lookup.preset, cfg.data.dataset, cfg.data.root,
                                         _row_changes(plan, lookup, seed)))
        else:
            found.append((seed, run, cfg))
    first_cfg = found[0][2] if found else cfg
    spec = first_cfg.data.dataset
    out.update(data=spec if test is None else f"{spec} -> {test[0]}",
               backbones=f"{first_cfg.image.arch}+{first_cfg.text.arch}",
               init=encoder_init(found[0][1] if found else None, first_cfg),
               seeds=f"{len(found)}/{lookup.seeds}", train="; ".join(missing))
    if not found:
        return {**out, "status": "not run yet"}
    by_seed: list[dict[str, float]] = [{} for _ in range(lookup.seeds)]
    runs = [""] * lookup.seeds
    for seed, run, _ in found:
        by_seed[seed] = lookup.test_metrics(run, plan.rerank, test)
        runs[seed] = config_hash(run.config)
    measured = [m for m in by_seed if m]
    names = [k for k in measured[0] if all(k in m for m in measured)]
    mean = {k: float(pd.Series([m[k] for m in measured]).mean()) for k in names}
    sd = {k: float(pd.Series([m[k] for m in measured]).std(ddof=1)) if len(measured) > 1 else math.nan
          for k in names}
    stale = [seed for seed, run, _ in found if run.stale]  # made by other code than the current library
    reason = out["reason"]
    if stale:
        reason = "; ".join(filter(None, [reason, f"stale run(s) of seed(s) {stale}: made by other code "
                                         "(`tbps runs list --stale`; retrain with TBPS_STALE=retrain)"]))
    return {**out, "status": "measured", "metrics": mean, "sd": sd, "by_seed": by_seed, "runs": tuple(runs),
            "config": runs[found[0][0]], "stale": f"{len(stale)}/{len(found)}" if stale else "",
            "reason": reason}


# ----------------------------------------------------------------------------------------------------
# The reproduction table


def _ours(metrics: Mapping[str, float], metric: str) -> float:
    """One metric of a measured metrics dict (NaN when absent); ``Rsum`` = R1 + R5 + R10."""
    if metric == "Rsum":
        parts = [metrics.get(k) for k in ("R1", "R5", "R10")]
        return float(sum(parts)) if all(p is not None for p in parts) else math.nan
    return float(metrics[metric]) if metric in metrics else math.nan


def reproduction_table(paper: str, table: str | int, dataset: str | None = None, preset: str = "smoke",
                       runs_dir: str | os.PathLike | None = None, *, roots: Mapping[str, str] | None = None,
                       sources: Mapping[str, str] | None = None, lookup: RunLookup | None = None) -> pd.DataFrame:
    """The rows of :func:`paper_table` with the workbook's numbers beside the reported ones.

    One line per (row, paper dataset), datasets in the order the paper prints them, rows in paper order
    within a dataset. Columns: ``order``, ``row`` (and ``backbone`` where printed), ``dataset`` (the
    paper's), ``status``; for each metric the table reports, ``<m> paper``, ``<m> ours`` (mean over
    seeds), ``<m> sd`` (standard deviation over seeds) and ``<m> Δ`` (ours - paper, percentage points;
    ``Rsum`` ours = R1 + R5 + R10); ``seeds`` (found/asked, e.g. ``2/3``); ``sign`` (the steps of
    :data:`STEPS` that end at this row: ``vs <row>: agree|disagree|within noise|...``); ``reason``;
    ``<m> by seed`` (tuple of per-seed values, NaN where missing) and ``runs`` (per-seed run hashes,
    comma-separated, empty where missing); provenance: ``data``
    (the workbook dataset, ``train -> test`` for cross-domain rows), ``preset``, ``backbones``, ``init``
    (image/text: random or pretrained), ``config`` (hash of the first seed's run config), ``rerank`` (the
    evaluation-only variant); ``train`` (the commands that train the seeds' runs that are not there yet).
    ``ours`` is NaN unless ``status`` is ``measured``.

    A table whose numbers are not in the paper text raises :class:`tbps_lib.reported.MissingTableError`.
    ``dataset`` keeps one paper dataset's lines (a column name such as ``"RSTPReid"`` or
    ``"CUHK-PEDES->ICFG-PEDES"``). ``roots`` / ``sources`` / ``runs_dir`` / ``preset`` build a
    :class:`RunLookup` unless ``lookup`` (shared by several tables) is given. Reads the registry only.
    ``attrs``: paper, table, caption, kind, preset.
    """
    lookup = lookup or RunLookup(preset, runs_dir, roots, sources)
    if lookup.preset != preset:
        raise ValueError(f"lookup is for preset {lookup.preset!r}, the table was asked for {preset!r}")
    info, long = _reported_table(paper, table)
    datasets = list(dict.fromkeys(long.sort_values("order", kind="stable")["dataset"]))
    if dataset is not None:
        if dataset not in datasets:
            raise ValueError(f"{paper} Table {info['table']} has no dataset {dataset!r}; it has {datasets}")
        datasets = [dataset]
    metrics = [m for m in METRICS if m in set(long["metric"])]
    with_backbone = long["backbone"].ne("").any()
    first = long.sort_values("order", kind="stable").drop_duplicates("order").set_index("order")
    plans = {o: plan_row(paper, info["table"], o, r["row"], r["variant"], r["config"], preset)
             for o, r in first.iterrows()}
    records = []
    for name in datasets:
        cells = long[long["dataset"] == name]
        for order in sorted(set(cells["order"])):
            reported = cells[cells["order"] == order].set_index("metric")["value"]
            result = measure_row(plans[order], name, lookup)
            rec: dict[str, Any] = {"order": order, "row": first.loc[order, "row"]}
            if with_backbone:
                rec["backbone"] = first.loc[order, "backbone"]
            rec.update(dataset=name, status=result["status"])
            for m in metrics:
                theirs = float(reported.get(m, math.nan))
                ours = _ours(result["metrics"], m)
                rec.update({f"{m} paper": theirs, f"{m} ours": ours, f"{m} sd": _ours(result["sd"], m),
                            f"{m} Δ": ours - theirs})
            rec.update(seeds=result["seeds"], sign="", reason=result["reason"])
            rec.update({f"{m} by seed": tuple(_ours(s, m) for s in result["by_seed"]) for m in metrics})
            rec.update(runs=",".join(result["runs"]), data=result["data"], preset=preset,
                       backbones=result["backbones"], init=result["init"], config=result["config"],
                       rerank=result["rerank"], train=result["train"], stale=result["stale"])
            records.append(rec)
    frame = pd.DataFrame.from_records(records)
    frame.attrs = {"paper": paper, "table": info["table"], "caption": info["caption"], "kind": info["kind"],
                   "preset": preset}
    steps = sign_agreement(frame)
    for (order, name), group in steps.groupby(["to_order", "dataset"], sort=False):
        mask = (frame["order"] == order) & (frame["dataset"] == name)
        frame.loc[mask, "sign"] = "; ".join(f"vs {a}: {r}" for a, r in zip(group["from"], group["result"]))
    return frame


def _label(frame: pd.DataFrame, order: int) -> str:
    row = frame[frame["order"] == order].iloc[0]
    backbone = row.get("backbone", "")
    return f"{row['row']} ({backbone})" if isinstance(backbone, str) and backbone else str(row["row"])


def _sign(x: float) -> int:
    return int(x > 0) - int(x < 0)


def paired_difference(before: Iterable[float], after: Iterable[float]) -> tuple[float, float, int]:
    """(mean Δ, noise, n) of a step measured per seed: d_s = after_s - before_s over the seeds where both
    are measured (NaN = missing), mean Δ = mean(d), noise = :data:`NOISE_SE` * sd(d) / sqrt(n) (NaN for
    n < 2: one pair says nothing about the noise). Pairing by seed removes what the two rows share
    (the seed's data order, initialisation and validation split)."""
    pairs = [(a, b) for a, b in zip(before, after) if not (math.isnan(a) or math.isnan(b))]
    n = len(pairs)
    if n == 0:
        return math.nan, math.nan, 0
    d = pd.Series([b - a for a, b in pairs], dtype=float)
    noise = NOISE_SE * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    return float(d.mean()), noise, n


def step_result(paper_delta: float, ours_delta: float, noise: float, same_run: bool = False) -> str:
    """The result of one step: ``agree`` / ``disagree`` (the sign of ``ours_delta`` against the paper's)
    only when |ours_delta| > ``noise`` (:func:`paired_difference`: 2 standard errors of the paired
    difference), else ``within noise``; so a change of exactly zero is never ``disagree``. Not counted
    (:data:`UNCOUNTED`): the paper leaves a cell blank or shows no change, a row has no measurement,
    fewer than two paired seeds (``noise`` NaN), or both rows resolve to the same runs."""
    if math.isnan(paper_delta):
        return "paper: not reported"
    if paper_delta == 0:
        return "paper: no change"
    if math.isnan(ours_delta):
        return "not measured"
    if same_run:
        return "same run"
    if math.isnan(noise):
        return "too few seeds"
    if not abs(ours_delta) > noise:
        return "within noise"
    return "agree" if _sign(ours_delta) == _sign(paper_delta) else "disagree"


def _run_key(row: pd.Series) -> str:
    """What a row's numbers come from: its seeds' runs, evaluation variant and test data."""
    return f"{row['runs']}|{row['rerank']}|{row['data']}"


def sign_agreement(frame: pd.DataFrame, metric: str = SIGN_METRIC) -> pd.DataFrame:
    """The steps of :data:`STEPS` for a :func:`reproduction_table` frame, one line per (step, dataset):
    ``paper``, ``table``, ``from``, ``to``, ``to_order``, ``what``, ``dataset``, ``metric``, ``paper Δ``,
    ``ours Δ`` (mean paired difference to - from over the seeds both rows have), ``noise`` (its band,
    :func:`paired_difference`), ``n`` (paired seeds), ``result`` (:func:`step_result`) and ``pair`` (what
    the two rows' numbers come from: runs, variant, test data; empty unless both are measured). Tables
    without steps give no lines."""
    paper, table = frame.attrs["paper"], frame.attrs["table"]
    lines = []
    if f"{metric} paper" in frame.columns:
        for a, b, what in STEPS.get((paper, table), ()):
            for name in dict.fromkeys(frame["dataset"]):
                rows = frame[frame["dataset"] == name].set_index("order")
                if a not in rows.index or b not in rows.index:
                    continue
                paper_delta = float(rows.loc[b, f"{metric} paper"] - rows.loc[a, f"{metric} paper"])
                ours_delta, noise, n = paired_difference(rows.loc[a, f"{metric} by seed"],
                                                         rows.loc[b, f"{metric} by seed"])
                key_a, key_b = _run_key(rows.loc[a]), _run_key(rows.loc[b])
                both = rows.loc[a, "status"] == rows.loc[b, "status"] == "measured"
                same = both and key_a == key_b
                lines.append([paper, table, _label(frame, a), _label(frame, b), b, what, name, metric,
                              paper_delta, ours_delta, noise, n, step_result(paper_delta, ours_delta, noise, same),
                              f"{key_a} -> {key_b}" if both else ""])
    return pd.DataFrame(lines, columns=list(STEP_COLUMNS))


def reproduce_paper(paper: str, lookup: RunLookup, dataset: str | None = None) -> dict[str, pd.DataFrame | None]:
    """:func:`reproduction_table` of every table of ``paper`` (None for a table not in the paper text);
    ``dataset`` keeps one paper dataset (tables without it are skipped)."""
    out: dict[str, pd.DataFrame | None] = {}
    for table in available_tables(paper):
        info = table_info(paper, table)
        if info["status"] == "missing":
            out[table] = None
            continue
        if dataset is not None and dataset not in set(load_reported(paper, table)["dataset"]):
            continue
        out[table] = reproduction_table(paper, table, dataset, lookup.preset, lookup=lookup)
    return out


def status_counts(tables: Mapping[str, Mapping[str, pd.DataFrame | None]]) -> pd.DataFrame:
    """Lines per status for each paper (``tables``: paper -> :func:`reproduce_paper` result)."""
    rows = {paper: pd.concat([f["status"] for f in frames.values() if f is not None], ignore_index=True)
            .value_counts().reindex(list(STATUSES), fill_value=0) for paper, frames in tables.items()}
    return pd.DataFrame(rows).T.rename_axis("paper")


def mark_repeats(steps: pd.DataFrame) -> pd.DataFrame:
    """``steps`` with a boolean column ``repeat``: True for a counted line (:data:`COUNTED`) whose pair of
    runs (column ``pair``) already stands for an earlier counted line of the same paper, so that a pair
    of runs that stands for several steps counts once."""
    counted = steps["result"].isin(COUNTED) & steps["pair"].ne("")
    repeat = counted & steps[counted].duplicated(["paper", "pair"]).reindex(steps.index, fill_value=False)
    return steps.assign(repeat=repeat.astype(bool))


def all_steps(tables: Mapping[str, Mapping[str, pd.DataFrame | None]]) -> pd.DataFrame:
    """Every step line (:func:`sign_agreement`) of every table (``tables``: paper -> tables), with the
    column ``repeat`` of :func:`mark_repeats`."""
    frames = [sign_agreement(f) for frames in tables.values() for f in frames.values() if f is not None]
    frames = [f for f in frames if len(f)]
    steps = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(STEP_COLUMNS))
    return mark_repeats(steps)


def sign_summary(tables: Mapping[str, Mapping[str, pd.DataFrame | None]]) -> pd.DataFrame:
    """Per paper: ``steps`` (step x dataset lines), ``measured`` (distinct pairs of runs with a counted
    result, :data:`COUNTED`), the three counts ``agree`` / ``disagree`` / ``within noise`` (each pair of
    runs once), ``repeated pair`` (counted lines left out as repetitions), ``agree %`` (agree over
    measured), and the uncounted lines by reason (:data:`UNCOUNTED`)."""
    steps = all_steps(tables)
    rows = []
    for paper in tables:
        mine = steps[steps["paper"] == paper]
        res = mine.loc[~mine["repeat"].astype(bool), "result"]
        counts = {c: int((res == c).sum()) for c in COUNTED}
        measured = sum(counts.values())
        rows.append({"paper": paper, "steps": len(mine), "measured": measured, **counts,
                     "repeated pair": int(mine["repeat"].astype(bool).sum()),
                     "agree %": 100.0 * counts["agree"] / measured if measured else math.nan,
                     **{reason: int((res == reason).sum()) for reason in UNCOUNTED}})
    return pd.DataFrame(rows).set_index("paper")


DISPLAY_ID = ("row", "backbone", "dataset")


def compact(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns to read a reproduction table by: row, dataset, paper/ours/sd/Δ per metric, seeds, status,
    sign, reason (per-seed values, provenance and the training commands stay in the full frame and its CSV)."""
    metric_cols = [c for c in frame.columns if c.endswith((" paper", " ours", " sd", " Δ"))]
    keep = [c for c in DISPLAY_ID if c in frame.columns] + metric_cols + ["seeds", "status", "sign", "reason",
                                                                          "config"]
    return frame[keep]


def format_reproduction(frame: pd.DataFrame) -> str:
    """A reproduction table as text: its title, the :func:`compact` columns, and the provenance of the
    runs it used (first seed's config hash, seeds found/asked, data, backbones, initialisation)."""
    attrs = frame.attrs
    title = f"{attrs['paper']} Table {attrs['table']} ({attrs['kind']}), reproduced in the {attrs['preset']} preset"
    body = compact(frame).to_string(index=False, float_format=lambda v: f"{v:.2f}", na_rep="-")
    runs = frame[frame["status"] == "measured"][["data", "backbones", "init", "config", "seeds"]].drop_duplicates()
    prov = [f"  run {r.config} ({r.seeds} seeds): data {r.data}, backbones {r.backbones}, init {r.init}"
            for r in runs.itertuples()]
    return "\n".join([title, body, *prov])


def format_paper_reproduction(paper: str, tables: Mapping[str, pd.DataFrame | None]) -> str:
    """All reproduction tables of a paper as text (:func:`format_reproduction`); missing tables say so."""
    blocks = []
    for table, frame in tables.items():
        if frame is None:
            info = table_info(paper, table)
            blocks.append(f"{paper} Table {table}: not in the paper text ({info['reason']})")
        else:
            blocks.append(format_reproduction(frame))
    return "\n\n".join(blocks)


def reproduce_all(lookup: RunLookup, which: Iterable[str] | None = None) -> dict[str, dict[str, pd.DataFrame | None]]:
    """:func:`reproduce_paper` for each paper in ``which`` (default: all five, in the workbook's order)."""
    return {paper: reproduce_paper(paper, lookup) for paper in (which or PAPERS)}
