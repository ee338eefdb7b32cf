"""``${column}`` templates: parsing, the checks before any request, and per-row rendering."""

from __future__ import annotations

import difflib
import string
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pandas as pd

from .errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["PromptTemplate"]


class _Pattern(string.Template):
    # `${...}` accepts any column name without a closing brace (`${source url}`, `${2024}`);
    # bare `$name` keeps string.Template's identifier rule.
    braceidpattern = r"[^}]+"


class PromptTemplate:
    """A prompt with ``${column}`` placeholders, checked against a frame's columns.

    Parameters
    ----------
    text : str
        ``string.Template`` syntax: ``${column}`` (or ``$column`` for identifiers)
        substitutes ``str()`` of the row's value, ``$$`` is a literal ``$``.

    Raises
    ------
    ConfigurationError
        If ``text`` is not a string, or uses ``$`` in a way ``string.Template`` rejects.
    """

    def __init__(self, text: str) -> None:
        if not isinstance(text, str):
            raise ConfigurationError(
                f"template must be a string such as 'Summarize: ${{text}}', got {type(text).__name__}"
            )
        self.text = text
        self._pattern = _Pattern(text)
        self.columns = self._placeholders()

    def _placeholders(self) -> tuple[str, ...]:
        names: list[str] = []
        for match in self._pattern.pattern.finditer(self.text):
            if match.group("invalid") is not None:
                pos = match.start("invalid")
                raise ConfigurationError(
                    f"template has a stray '$' at position {pos}: {self.text[max(0, pos - 10):pos + 10]!r}."
                    " Write ${column} for a column's value and $$ for a literal dollar sign."
                )
            name = match.group("named") or match.group("braced")
            if name is not None and name not in names:
                names.append(name)
        return tuple(names)

    def check(self, available: Sequence[object]) -> None:
        """Raise if the template names a column the frame lacks.

        Raises
        ------
        ConfigurationError
            Naming the missing column(s), the closest match, and the available columns.
        """
        by_name = {str(c) for c in available}
        missing = [c for c in self.columns if c not in by_name]
        if not missing:
            return
        hints = []
        for name in missing:
            close = difflib.get_close_matches(name, list(by_name), n=1)
            if close:
                hints.append(f"did you mean ${{{close[0]}}} for ${{{name}}}?")
        hint = (" " + " ".join(hints)) if hints else ""
        raise ConfigurationError(
            f"template names column(s) {missing} that the DataFrame does not have; "
            f"available columns: {[str(c) for c in available]}.{hint}"
        )

    def render(self, values: dict[str, object]) -> str:
        """Substitute one row's values (``str()`` of each)."""
        return self._pattern.substitute({k: str(v) for k, v in values.items()})

    def rows(self, frame: pd.DataFrame) -> Iterator[str | None]:
        """Yield the rendered prompt of each row in order, or ``None`` when a value is missing.

        Rendering is lazy so a 10-million-row frame never holds every prompt at once.
        """
        self.check(frame.columns)
        if not self.columns:
            for _ in range(len(frame)):
                yield self.text
            return
        # Column labels may be non-strings (ints) or duplicated; resolve each name to one position.
        positions = []
        for name in self.columns:
            matches = [i for i, c in enumerate(frame.columns) if str(c) == name]
            if len(matches) > 1:
                raise ConfigurationError(
                    f"column {name!r} appears {len(matches)} times in the DataFrame; "
                    "rename the duplicates before using it in a template"
                )
            positions.append(matches[0])
        missing = frame.iloc[:, positions].isna().to_numpy()
        columns = [frame.iloc[:, p].to_numpy(dtype=object) for p in positions]
        names = self.columns
        substitute = self._pattern.substitute
        for i in range(len(frame)):
            if missing[i].any():
                yield None
            else:
                yield substitute({name: str(col[i]) for name, col in zip(names, columns)})
