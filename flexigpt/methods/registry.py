"""Which methods exist? The one registry the plan, surgery, parameters, exports, CLI and app ask."""
from __future__ import annotations

from flexigpt.methods.base import Method

__all__ = ["get_method", "method_names", "methods", "register", "unregister"]

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` (an instance of a ``Method`` subclass); its ``name`` must be new."""
    if not isinstance(method, Method):
        raise ValueError(f"register() takes a flexigpt.methods.Method instance, got {type(method).__name__}")
    if not method.name or not method.name.isidentifier():
        raise ValueError(f"a method's name must be an identifier, got {method.name!r}")
    if method.name in _REGISTRY and _REGISTRY[method.name] is not method:
        raise ValueError(f"method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests that register a toy method clean up with this)."""
    _REGISTRY.pop(name, None)


def get_method(name: str) -> Method:
    """The registered method called ``name``.

    Raises:
        ValueError: naming the unknown method and the valid ones.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(_REGISTRY)}") from None


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def methods() -> tuple[Method, ...]:
    return tuple(_REGISTRY.values())
