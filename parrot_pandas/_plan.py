"""What one run asks of the server: from a rendered prompt to a request, a cache key and a parser.

The scheduler stays ignorant of templates, fields and output shapes: it asks the plan.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from types import MappingProxyType
from typing import Any

from ._cache_key import answer_key_function
from ._config import RunConfig
from ._structured import Field, Fields, normalize_fields
from ._tokens import approximate_tokens
from .providers import Call

__all__ = ["RequestPlan"]


@dataclass(frozen=True)
class RequestPlan:
    """How every row's prompt becomes a request, and every answer a value.

    Parameters
    ----------
    config : RunConfig
        The run's settings.
    fields : Fields, optional
        For ``extract``: the fields, compiled once (a tuple of :class:`Field` is compiled on
        construction); ``None`` for ``generate``.
    strategy : str
        How a structured answer is asked for (see ``config.STRUCTURED_STRATEGIES``).
    """

    config: RunConfig
    fields: Fields | tuple[Field, ...] | None = None
    strategy: str | None = None

    def __post_init__(self) -> None:
        if self.fields is not None and not isinstance(self.fields, Fields):
            object.__setattr__(self, "fields", normalize_fields(self.fields))

    @cached_property
    def schema(self) -> dict[str, Any] | None:
        """The JSON Schema of a structured answer, ``None`` for free text (shared: read only)."""
        return self.fields.schema if self.fields is not None else None

    @cached_property
    def _schema_tokens(self) -> int:
        return approximate_tokens(json.dumps(self.schema)) if self.schema is not None else 0

    def with_strategy(self, strategy: str) -> RequestPlan:
        """The same plan asking for structured answers another way."""
        return RequestPlan(self.config, self.fields, strategy)

    def messages(self, prompt: str) -> tuple[dict[str, str], ...]:
        """The chat messages for ``prompt``: the optional system message, then the user's."""
        system = self.config.system
        if self.fields is not None and self.strategy in ("json_object", "prompt"):
            # Without native structured output the schema has to travel in the text.
            instructions = self.fields.instructions
            system = f"{system}\n\n{instructions}" if system else instructions
        return _chat(system, prompt)

    def key(self, prompt: str) -> str:
        """The cache key: everything that shapes the answer, never the API key.

        The structured-output strategy (and the schema text it may add to the messages) is
        left out on purpose: any strategy's valid answer to the same schema serves, so a
        fallback in one run does not void the cache.
        """
        return self._key(list(_chat(self.config.system, prompt)))

    @cached_property
    def _key(self) -> Callable[[Any], str]:
        # Everything but the messages is the same for every row: encoded once per run.
        config = self.config
        return answer_key_function(
            base_url=config.base_url,
            model=config.model,
            params=config.request_params,
            schema=self.schema,
            provider=config.provider,
        )

    def call(self, prompt: str, n: int) -> Call:
        """The request asking ``n`` samples for ``prompt``."""
        return Call(
            model=self.config.model,
            messages=self.messages(prompt),
            n=n,
            params=self._params,
            schema=self.schema,
            strategy=self.strategy if self.fields is not None else None,
        )

    def cost(self, call: Call, prompt_ratio: float = 1.0) -> int:
        """Tokens the provider counts against the limit on admission: prompt + n * max_tokens.

        Takes the built call, so its messages are not rendered a second time per request.
        """
        # Providers count the tool / response-format schema as prompt tokens too.
        tokens = sum(approximate_tokens(m["content"]) for m in call.messages)
        tokens += self._schema_tokens
        return math.ceil(tokens * prompt_ratio) + call.n * self._max_output

    @cached_property
    def _params(self) -> Mapping[str, Any]:
        # Built once per run and shared read-only by every request (providers copy it).
        return MappingProxyType(self.config.request_params)

    @cached_property
    def _max_output(self) -> int:
        return self.config.max_output_tokens or 0

    @cached_property
    def parse(self) -> Callable[[str], Any]:
        """Text of one sample -> its value (raises ``StructuredOutputError`` when invalid).

        For ``extract``, the fields' compiled parser: types were analysed when the fields
        were built, so each answer is checked and coerced exactly once, here.
        """
        if self.fields is None:
            return _text
        return self.fields.parse

    def combine(self, samples: list[Any]) -> list[Any]:
        """The distinct outputs of a row's samples, in first-seen order."""
        if self.fields is None:
            return list(dict.fromkeys(samples))
        return self.fields.dedupe(item for items in samples for item in items)


def _chat(system: str | None, prompt: str) -> tuple[dict[str, str], ...]:
    if system:
        return ({"role": "system", "content": system}, {"role": "user", "content": prompt})
    return ({"role": "user", "content": prompt},)


def _text(text: str) -> str:
    return text
