"""tbps_lib: a reproduction workbook for text-based person search (TBPS).

Data flows one way: ``data`` -> ``models`` -> ``engine`` -> ``analysis`` / ``search``.
See the README for the notebook map and ``CONTRIBUTING.md`` for the layout and the method contract.
"""
__version__ = "0.1.0"
