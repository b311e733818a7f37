"""Models: encoders, shared layers, and one module per method, each registered by name."""
from tbps_lib.models.registry import build_model, list_methods, method_spec, register_method

__all__ = ["build_model", "list_methods", "method_spec", "register_method"]
