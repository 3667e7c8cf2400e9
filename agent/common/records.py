"""``@record``: the part of ``@dataclass`` this project uses, without ``dataclasses``.

``import dataclasses`` imports ``inspect`` and with it ``ast``, ``dis`` and ``tokenize``:
about 15 ms of start-up on a small machine, a sixth of a ``ced run``. The classes the
CLI's run, ping and status paths load are records instead; the rest of the project
keeps ``dataclasses``.

A record is declared exactly as a dataclass (``name: type = default``, or
``field(default_factory=...)``), and type checkers treat it as one (PEP 681
``dataclass_transform``). It gets ``__init__`` (positional or keyword, in field order),
``__repr__``, ``__eq__`` (same class, equal fields) and, with ``frozen=True``,
immutability and ``__hash__``; a mutable record is unhashable, as a dataclass is.
:func:`fields` lists the fields (``name``, ``type`` as written, ``default``,
``default_factory``). Not supported: ``ClassVar``, ``InitVar``, ``order``, ``slots``,
``kw_only`` and the other ``field()`` options.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, dataclass_transform, overload

T = TypeVar("T")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class FrozenInstanceError(AttributeError):
    """Assignment to a field of a frozen record."""


class Field:
    __slots__ = ("default", "default_factory", "name", "type")

    def __init__(self, default: Any = MISSING, default_factory: Any = MISSING) -> None:
        if default is not MISSING and default_factory is not MISSING:
            raise ValueError("cannot specify both default and default_factory")
        self.name = ""
        self.type: Any = None
        self.default = default
        self.default_factory = default_factory

    def __repr__(self) -> str:
        return f"Field(name={self.name!r}, type={self.type!r}, default={self.default!r})"


@overload
def field(*, default: T) -> T: ...
@overload
def field(*, default_factory: Callable[[], T]) -> T: ...
def field(*, default: Any = MISSING, default_factory: Any = MISSING) -> Any:
    """A field with a default, or with a factory called for each new instance."""
    return Field(default, default_factory)


def fields(obj: Any) -> tuple[Field, ...]:
    """The fields of a record class or instance, in declaration order."""
    try:
        found: tuple[Field, ...] = obj.__record_fields__
    except AttributeError:
        raise TypeError("not a record class or instance") from None
    return found


@overload
def record(cls: type[T], /) -> type[T]: ...
@overload
def record(*, frozen: bool = False) -> Callable[[type[T]], type[T]]: ...
@dataclass_transform(field_specifiers=(field, Field))
def record(cls: type[T] | None = None, /, *, frozen: bool = False) -> Any:
    """Make ``cls`` a record (see the module documentation)."""

    def wrap(c: type[T]) -> type[T]:
        return _process(c, frozen)

    return wrap if cls is None else wrap(cls)


def _collect(cls: type) -> tuple[Field, ...]:
    found: dict[str, Field] = {}
    for base in reversed(cls.__mro__[1:]):
        for f in base.__dict__.get("__record_fields__", ()):
            found[f.name] = f
    own = cls.__dict__.get("__annotations__", {})  # noqa: RUF063 (inspect is what we avoid)
    for name, annotation in own.items():
        if "ClassVar" in str(annotation) or "InitVar" in str(annotation):
            raise TypeError(f"{cls.__name__}.{name}: ClassVar and InitVar are not supported")
        value = cls.__dict__.get(name, MISSING)
        f = value if isinstance(value, Field) else Field(default=value)
        f.name, f.type = name, annotation
        if f.default is not MISSING and type(f.default).__hash__ is None:
            raise ValueError(f"mutable default {type(f.default).__name__} for field {name} "
                             "is not allowed: use default_factory")  # fmt: skip
        if isinstance(value, Field):  # the class attribute is the default, as in dataclasses
            if f.default is MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, f.default)
        found[name] = f
    out = tuple(found.values())
    seen_default = False
    for f in out:
        if f.default is not MISSING or f.default_factory is not MISSING:
            seen_default = True
        elif seen_default:
            raise TypeError(f"non-default argument {f.name!r} follows default argument")
    return out


def _process(cls: type[T], frozen: bool) -> type[T]:
    specs = _collect(cls)
    names = tuple(f.name for f in specs)
    qualname = cls.__qualname__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(specs):
            raise TypeError(f"{qualname}() takes {len(specs)} positional arguments "
                            f"but {len(args)} were given")  # fmt: skip
        for f, value in zip(specs, args, strict=False):
            if f.name in kwargs:
                raise TypeError(f"{qualname}() got multiple values for argument {f.name!r}")
            object.__setattr__(self, f.name, value)
        for f in specs[len(args) :]:
            if f.name in kwargs:
                value = kwargs.pop(f.name)
            elif f.default_factory is not MISSING:
                value = f.default_factory()
            elif f.default is not MISSING:
                value = f.default
            else:
                raise TypeError(f"{qualname}() missing required argument: {f.name!r}")
            object.__setattr__(self, f.name, value)
        if kwargs:
            raise TypeError(f"{qualname}() got an unexpected keyword argument "
                            f"{next(iter(kwargs))!r}")  # fmt: skip
        post_init = getattr(self, "__post_init__", None)
        if post_init is not None:
            post_init()

    def __repr__(self: Any) -> str:
        inner = ", ".join(f"{n}={getattr(self, n)!r}" for n in names)
        return f"{type(self).__qualname__}({inner})"

    def __eq__(self: Any, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return tuple(getattr(self, n) for n in names) == tuple(getattr(other, n) for n in names)

    cls.__record_fields__ = specs  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[method-assign]
    cls.__repr__ = __repr__  # type: ignore[method-assign]
    cls.__eq__ = __eq__  # type: ignore[method-assign]
    if frozen:

        def __setattr__(self: Any, name: str, value: Any) -> None:
            if type(self) is cls or name in names:
                raise FrozenInstanceError(f"cannot assign to field {name!r}")
            object.__setattr__(self, name, value)

        def __delattr__(self: Any, name: str) -> None:
            if type(self) is cls or name in names:
                raise FrozenInstanceError(f"cannot delete field {name!r}")
            object.__delattr__(self, name)

        def __hash__(self: Any) -> int:
            return hash(tuple(getattr(self, n) for n in names))

        cls.__setattr__ = __setattr__  # type: ignore[method-assign]
        cls.__delattr__ = __delattr__  # type: ignore[method-assign]
        cls.__hash__ = __hash__  # type: ignore[method-assign]
    elif "__hash__" not in cls.__dict__ or cls.__dict__["__hash__"] is None:
        cls.__hash__ = None  # type: ignore[assignment]
    return cls
