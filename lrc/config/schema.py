"""Typed options: the constructor signature of every ``_target_`` is its structured config.

A schema dataclass is made from the signature's type hints (``float``, ``int | None``,
``list[str]``, ...); the options of a config node are merged into ``OmegaConf.structured`` of
it, so OmegaConf checks each option's type and names the key: ``factorizer.damping=abc``
answers ``factorizer=svdllm: damping='abc' is not a float``, not an error from deep inside.
lrc's own checks (in the constructors) then judge ranges and meanings. A new method needs no
schema of its own: its type hints are the schema.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import inspect
import re
import types
import typing
from typing import Any, Optional

from hydra.utils import get_object
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from lrc.errors import ConfigError

PRIMITIVES = (bool, int, float, str)
SEQUENCES = (list, tuple, collections.abc.Sequence)


def _field_type(hint: Any) -> Any:
    """The OmegaConf type of a type hint; Any where OmegaConf has none (objects, unions)."""
    if hint in PRIMITIVES:
        return hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = _field_type(rest[0]) if len(rest) == 1 else Any
        return Optional[inner] if inner is not Any and type(None) in args else Any  # noqa: UP045 - OmegaConf
    if origin in SEQUENCES and args and args[0] in PRIMITIVES and (origin is not tuple or args[-1] is Ellipsis):
        return Optional[list[args[0]]]  # noqa: UP045 - OmegaConf needs typing.Optional
    return Any


def _field(name: str, hint: Any, default: Any) -> tuple[str, Any, Any]:
    typ = _field_type(hint)
    if repr(default) == "<factory>":  # a dataclass field with a default_factory: any value of its type
        default = None
    if default is None and typ is not Any and typing.get_origin(typ) is not typing.Union:
        typ = Optional[typ]  # noqa: UP045
    if default is inspect.Parameter.empty:
        return name, typ, dataclasses.field(default=MISSING)
    if isinstance(default, (list, tuple, dict)):
        return name, typ, dataclasses.field(default_factory=lambda d=default: list(d) if isinstance(d, tuple) else d)
    return name, typ, dataclasses.field(default=default)


def schema_for(target: Any) -> type | None:
    """A dataclass of ``target``'s keyword options, typed from its hints; None when it takes
    ``**kwargs`` (anything goes) or has no signature."""
    function = target.__init__ if inspect.isclass(target) else target
    try:
        signature = inspect.signature(target)
        hints = typing.get_type_hints(function)
    except (TypeError, ValueError, NameError):
        return None
    params = [p for p in signature.parameters.values() if p.name != "self"]
    if any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params):
        return None
    fields = [_field(p.name, hints.get(p.name, Any), p.default) for p in params if not p.name.startswith("_")]
    return dataclasses.make_dataclass(f"{getattr(target, '__name__', 'target')}Options", fields)


def check_options(target: Any, options: dict[str, Any], what: str) -> None:
    """Raise a ConfigError naming the option and the type it needs when ``options`` do not fit
    ``target``'s signature (a wrong type, an unknown key)."""
    if isinstance(target, str):
        target = resolve_target(target, what)
    schema = schema_for(target)
    if schema is None:
        return
    given = {k: v for k, v in options.items() if not k.startswith("_")}
    try:
        OmegaConf.merge(OmegaConf.structured(schema), given)
    except ConfigKeyError as exc:
        known = sorted(f.name for f in dataclasses.fields(schema))
        raise ConfigError(f"{what}: unknown option {exc.key!r}; known: {known}") from None
    except ValidationError as exc:
        key = re.split(r"[.\[]", str(exc.full_key or exc.key))[0]
        field = next((f for f in dataclasses.fields(schema) if f.name == key), None)
        wanted = _type_name(field.type) if field is not None else "of the expected type"
        raise ConfigError(f"{what}: {key}={given.get(key)!r} is not {wanted}") from None
    except OmegaConfBaseException as exc:  # anything else OmegaConf rejects, in one line
        raise ConfigError(f"{what}: {str(exc).splitlines()[0]}") from None


def resolve_target(path: str, what: str) -> Any:
    """The class or function a ``_target_`` names; a ConfigError when there is none."""
    try:
        return get_object(path)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{what}: _target_={path!r} names nothing importable ({exc})") from None


def _type_name(typ: Any) -> str:
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    optional = typing.get_origin(typ) is typing.Union and type(None) in typing.get_args(typ)
    base = args[0] if optional and len(args) == 1 else typ
    name = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(base)
    if name is None:
        inner = typing.get_args(base)
        name = f"a list of {_type_name(inner[0]).split(' ', 1)[-1]}s" if inner else str(base)
    return f"{name} or null" if optional else name
