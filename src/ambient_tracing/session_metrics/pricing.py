"""Token totals and what they cost: USD per million tokens, by the longest model-name prefix.

The default table is an estimate (list prices of a few models per vendor); pass your own
``pricing=`` to :class:`~ambient_tracing.Observability` to override or replace it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ambient_tracing.backends.base import TokenUsage

#: Longest model name that is priced; real ones are well under 100 characters.
MAX_MODEL_NAME_CHARS = 256


@dataclass(slots=True)
class TokenCounts:
    """Token totals under AG-UI's accounting: cache counts are parts of ``input``, reasoning of ``output``."""

    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0
    reasoning: int = 0

    def add(self, usage: TokenUsage) -> None:
        self.input += usage.input_tokens or 0
        self.output += usage.output_tokens or 0
        self.cache_read += usage.cache_read_tokens or 0
        self.cache_write += usage.cache_write_tokens or 0
        self.reasoning += usage.reasoning_tokens or 0

    def as_dict(self) -> dict[str, int]:
        return {
            "input": self.input,
            "output": self.output,
            "cache_read": self.cache_read,
            "cache_write": self.cache_write,
            "reasoning": self.reasoning,
            "total": self.input + self.output,
        }


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens. A cache price left None is charged at the input price."""

    input: float
    output: float
    cache_read: float | None = None
    cache_write: float | None = None


#: List prices (USD / 1M tokens) of a few models per vendor; an estimate, override with ``pricing=``.
DEFAULT_PRICES: Mapping[str, ModelPrice] = MappingProxyType(
    {
        # Anthropic (cache write = 5-minute cache)
        "claude-opus-4": ModelPrice(15.0, 75.0, 1.5, 18.75),
        "claude-opus-4-5": ModelPrice(5.0, 25.0, 0.5, 6.25),
        "claude-opus-4-6": ModelPrice(5.0, 25.0, 0.5, 6.25),
        "claude-sonnet-4": ModelPrice(3.0, 15.0, 0.3, 3.75),
        "claude-3-7-sonnet": ModelPrice(3.0, 15.0, 0.3, 3.75),
        "claude-haiku-4-5": ModelPrice(1.0, 5.0, 0.1, 1.25),
        "claude-3-5-haiku": ModelPrice(0.8, 4.0, 0.08, 1.0),
        # OpenAI (no cache write charge)
        "gpt-5": ModelPrice(1.25, 10.0, 0.125),
        "gpt-5-mini": ModelPrice(0.25, 2.0, 0.025),
        "gpt-5-nano": ModelPrice(0.05, 0.4, 0.005),
        "gpt-4.1": ModelPrice(2.0, 8.0, 0.5),
        "gpt-4.1-mini": ModelPrice(0.4, 1.6, 0.1),
        "gpt-4.1-nano": ModelPrice(0.1, 0.4, 0.025),
        "gpt-4o": ModelPrice(2.5, 10.0, 1.25),
        "gpt-4o-mini": ModelPrice(0.15, 0.6, 0.075),
        "o3": ModelPrice(2.0, 8.0, 0.5),
        "o3-mini": ModelPrice(1.1, 4.4, 0.55),
        "o4-mini": ModelPrice(1.1, 4.4, 0.275),
        # Google (prompts up to 200k tokens)
        "gemini-2.5-pro": ModelPrice(1.25, 10.0, 0.31),
        "gemini-2.5-flash": ModelPrice(0.3, 2.5, 0.075),
        "gemini-2.0-flash": ModelPrice(0.1, 0.4, 0.025),
        # Mistral
        "mistral-large": ModelPrice(2.0, 6.0),
        "mistral-medium": ModelPrice(0.4, 2.0),
        "mistral-small": ModelPrice(0.1, 0.3),
    }
)


class Pricing:
    """Prices by model-name prefix: the longest matching prefix wins, case-insensitively.

    ``prices`` are laid over :data:`DEFAULT_PRICES` (``include_defaults=False``: only ``prices``).
    A name with a provider prefix (``openai:gpt-4o``, ``anthropic/claude-…``,
    ``us.anthropic.claude-…``) is matched again after each ``:``, ``/`` or ``.`` when the whole
    name has no match. An unknown model has no price: it adds nothing to the cost and is listed.
    """

    def __init__(
        self, prices: Mapping[str, ModelPrice] | None = None, *, include_defaults: bool = True
    ) -> None:
        table = {**(DEFAULT_PRICES if include_defaults else {}), **(prices or {})}
        for prefix, price in table.items():
            if not isinstance(price, ModelPrice):
                raise TypeError(f"price of {prefix!r} must be a ModelPrice, got {type(price).__name__}")
        self._prefixes = sorted(((k.lower(), v) for k, v in table.items()), key=lambda kv: -len(kv[0]))

    def price(self, model: str | None) -> ModelPrice | None:
        """The price of the longest prefix matching the name (or a part after a provider prefix).

        Names longer than :data:`MAX_MODEL_NAME_CHARS` have no price: a name comes off the wire,
        and matching every part of a huge one would cost time quadratic in its length.
        """
        if not model or len(model) > MAX_MODEL_NAME_CHARS:
            return None
        name = model.strip().lower()
        for start in (0, *(i + 1 for i, char in enumerate(name) if char in ":/.")):
            for prefix, price in self._prefixes:
                if name.startswith(prefix, start):
                    return price
        return None

    def cost(self, model: str | None, tokens: TokenCounts) -> float | None:
        """USD for ``tokens`` of ``model`` under AG-UI's accounting (cache and reasoning counts are
        parts of the input and output totals); None when the model has no price."""
        price = self.price(model)
        if price is None:
            return None
        cache_read = price.input if price.cache_read is None else price.cache_read
        cache_write = price.input if price.cache_write is None else price.cache_write
        uncached = max(tokens.input - tokens.cache_read - tokens.cache_write, 0)
        return (
            uncached * price.input
            + tokens.cache_read * cache_read
            + tokens.cache_write * cache_write
            + tokens.output * price.output
        ) / 1_000_000
