"""The method registry: ``register_method(name, ...)`` on a model class, ``build_model(cfg)``.

A method module registers its model class (a ``models.base.RetrievalModel``) together with its own config
dataclass (a ``models.base.MethodConfig``) and its presets
(functions of the dataset spec that return dotted config changes, e.g. ``{"optim.lr": 1e-3}``).
Method modules are imported lazily, the first time the registry is asked, so ``import tbps_lib`` stays
light and a method whose optional pieces are missing does not break the others.

The registry imports nothing of the library at module level (``tbps_lib.config`` imports it, not the other
way round), and a method's figures are named by ``"module:function"`` strings that are imported only when
the figures are drawn, so registering a method never pulls in matplotlib.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

# Modules under tbps_lib/models/ that define methods, in the order the workbook introduces them.
METHOD_MODULES = ("baseline", "sew_mcm", "part_level", "acsa", "laip", "dssl")

PresetFn = Callable[[str], Mapping[str, Any]]
PaperRowFn = Callable[[Mapping[str, str], str], Mapping[str, Any]]
#: A figure builder: ``fn(runs, *, split, n_captions) -> (Figure | None, {table name: DataFrame})`` where
#: ``runs`` is ``{method: Run}``; None when the figure does not apply to these runs. Given to the registry
#: as the function or as a ``"package.module:function"`` string (imported when the figure is drawn).
FigureFn = Callable[..., Any]


class NotReproducible(ValueError):
    """A paper row that the workbook cannot run in the asked preset (the message says why)."""


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its model class, its config class, its presets by name and, optionally, how
    the rows of its paper's ablation tables map to configs.

    ``paper_rows(flags, preset)`` takes the ``config`` flags of a row of ``tbps_lib/reported/<paper>.csv``
    (parsed into a dict, e.g. ``{"sew_margin": "adaptive", "mcm": "1"}``) and the preset name, and returns
    the dotted config changes that make that row (given to ``make_config``); it raises
    :class:`NotReproducible` for a row that cannot be run in that preset.

    ``figures`` maps the file name of each figure the method's paper (or its notebook) draws to its builder
    (:data:`FigureFn`, or a ``"module:function"`` string); ``tbps figures`` /
    ``tbps_lib.analysis.figures.regenerate`` draw the figures of every registered method over the runs asked
    for, so a figure comparing methods (e.g. Sew's modality gap of the baseline against Sew/MCM) is drawn
    once for all of them. Figure names are unique across methods.

    ``trained_tables`` maps a notebook budget (``tbps_lib.config.BUDGETS``: ``"ci"``, ``"full"``, ``"all"``) to
    what the method's notebook trains in smoke mode under that budget: ``{table: rows}`` with the row labels
    to train, or ``None`` for every row of the table (a plain tuple of table names means every row of
    each). The notebook and ``tbps reproduce`` (which trains them all up front, several runs at a time)
    read the same entry.
    """

    name: str
    model_cls: type
    config_cls: type
    presets: Mapping[str, PresetFn]
    paper_rows: PaperRowFn | None = None
    figures: Mapping[str, FigureFn | str] = field(default_factory=dict)
    trained_tables: Mapping[str, Mapping[str, tuple[str, ...] | None]] = field(default_factory=dict)


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(name: str, config_cls: type, presets: Mapping[str, PresetFn],
                    paper_rows: PaperRowFn | None = None,
                    figures: Mapping[str, FigureFn | str] | None = None,
                    trained_tables: Mapping[str, Any] | None = None) -> Callable[[type], type]:
    """Class decorator: register ``model_cls`` as method ``name`` with its config class, presets and
    (optionally) the mapping of its paper's table rows to configs, its figures and the tables its notebook
    trains per budget (see :class:`MethodSpec`)."""
    from tbps_lib.models.base import MethodConfig, RetrievalModel

    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)):
        raise TypeError(f"method {name!r}: its config class {getattr(config_cls, '__name__', config_cls)} must "
                        f"subclass tbps_lib.models.base.MethodConfig (a frozen dataclass)")

    def deco(model_cls: type) -> type:
        if not issubclass(model_cls, RetrievalModel):
            raise TypeError(f"method {name!r}: {model_cls.__name__} must subclass "
                            f"tbps_lib.models.base.RetrievalModel")
        if name in _REGISTRY and _REGISTRY[name].model_cls is not model_cls:
            raise ValueError(f"method {name!r} is registered twice")
        tables = {budget: _table_rows(name, budget, chosen) for budget, chosen in (trained_tables or {}).items()}
        _REGISTRY[name] = MethodSpec(name, model_cls, config_cls, dict(presets), paper_rows, dict(figures or {}),
                                     tables)
        return model_cls
    return deco


def _table_rows(method: str, budget: str, chosen: Any) -> dict[str, tuple[str, ...] | None]:
    """``trained_tables[budget]`` as ``{table: rows or None}`` (see :class:`MethodSpec`)."""
    if isinstance(chosen, Mapping):
        out = {}
        for table, rows in chosen.items():
            if rows is not None and (isinstance(rows, str) or not rows):
                raise ValueError(f"method {method!r}: trained_tables[{budget!r}][{table!r}] must be a non-empty "
                                 f"tuple of row labels or None (every row), got {rows!r}")
            out[str(table)] = None if rows is None else tuple(rows)
        return out
    if isinstance(chosen, str):
        raise ValueError(f"method {method!r}: trained_tables[{budget!r}] must be a tuple of tables or a mapping "
                         f"table -> rows, got the string {chosen!r}")
    return {str(table): None for table in chosen}


def _load_all() -> None:
    for module in METHOD_MODULES:
        try:
            importlib.import_module(f"tbps_lib.models.{module}")
        except ModuleNotFoundError as e:  # a method not written yet: skip only its own module
            if e.name != f"tbps_lib.models.{module}":
                raise


def list_methods() -> list[str]:
    """Names of the registered methods, in the workbook's order."""
    _load_all()
    order = {m: i for i, m in enumerate(METHOD_MODULES)}
    return sorted(_REGISTRY, key=lambda m: (order.get(m, len(order)), m))


def method_spec(name: str) -> MethodSpec:
    """The registered method ``name``; an unknown name is an error listing the known ones."""
    if name not in _REGISTRY:
        _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; registered methods: {list_methods()}")
    return _REGISTRY[name]


def method_figures() -> dict[str, tuple[str, FigureFn]]:
    """Every registered method's figures in the workbook's order: ``{figure name: (method, builder)}``, with
    ``"module:function"`` builders imported. A name declared by two methods is an error naming both."""
    out: dict[str, tuple[str, FigureFn]] = {}
    for method in list_methods():
        for fig_name, fn in _REGISTRY[method].figures.items():
            if fig_name in out:
                raise ValueError(f"figure {fig_name!r} is declared by both {out[fig_name][0]!r} and {method!r}")
            if isinstance(fn, str):
                module, _, attr = fn.partition(":")
                fn = getattr(importlib.import_module(module), attr)
            out[fig_name] = (method, fn)
    return out


def build_model(cfg: Any) -> Any:
    """Build the model of ``cfg.method`` (a ``tbps_lib.config.Config``): a ``RetrievalModel``."""
    spec = method_spec(cfg.method)
    if not isinstance(cfg.model, spec.config_cls):
        raise TypeError(f"cfg.model is a {type(cfg.model).__name__}, method {cfg.method!r} expects "
                        f"{spec.config_cls.__name__}")
    return spec.model_cls(cfg)
