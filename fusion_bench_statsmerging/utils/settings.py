"""Each setting's type, checked against its constructor's annotation before any other check runs.

Hydra hands a method whatever the command line held: ``method.max_epochs=abc`` arrives as the text
``'abc'`` and would end, much later, in ``could not convert string to float: 'abc'`` without the key.
The annotations of the ``__init__`` signatures say what each setting is; :func:`check_setting_types`
turns the first value of another type into one error naming key, expected type and value.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any, Dict, Mapping, Optional, Tuple

from .errors import UserError

# plain types a value is checked against; annotations with anything else (lists, mappings) are left alone
_DESCRIPTIONS = {bool: "true or false", int: "an integer", float: "a number", str: "text"}


def setting_hints(cls: type) -> Dict[str, Any]:
    """Key -> annotation of every ``__init__`` parameter along ``cls``'s MRO (the subclass's wins)."""
    hints: Dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or not inspect.isfunction(init):
            continue
        try:
            hints.update(typing.get_type_hints(init))
        except Exception:  # an annotation that does not resolve: nothing to check against
            continue
    hints.pop("return", None)
    return hints


def _allowed(hint: Any) -> Optional[Tuple[type, ...]]:
    """The plain types ``hint`` admits (``type(None)`` for Optional), or None when it admits others too."""
    args = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
    kinds = tuple(a for a in args if a is not type(None))
    if not kinds or not all(k in _DESCRIPTIONS for k in kinds) or str in kinds:
        return None  # text is what a typo is too: a setting that takes text checks its own values
    return args


def fits(value: Any, allowed: Tuple[type, ...]) -> bool:
    """Whether ``value`` is one of ``allowed``; bools are not numbers, a whole float is an integer."""
    if value is None:
        return type(None) in allowed
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int):
        return int in allowed or float in allowed
    if isinstance(value, float):
        return float in allowed or (int in allowed and value.is_integer())
    return False


def describe(allowed: Tuple[type, ...]) -> str:
    """'a number (or null)': what the user may write."""
    kinds = [_DESCRIPTIONS[k] for k in allowed if k is not type(None)]
    return " or ".join(kinds) + (" (or null)" if type(None) in allowed else "")


def check_setting_types(cls: type, values: Mapping[str, Any], prefix: str = "method.") -> None:
    """Fail on the first setting whose value is not of its annotated type, naming key, type and value."""
    hints = setting_hints(cls)
    for key, value in values.items():
        allowed = _allowed(hints[key]) if key in hints else None
        if allowed is not None and not fits(value, allowed):
            raise UserError(f"{prefix}{key} must be {describe(allowed)}, got {value!r}.")
