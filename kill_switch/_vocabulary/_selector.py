"""Which sessions a kill by selector reaches: the one rule, for the runtime, the control
plane and the fleet."""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from collections.abc import Mapping


def _frozen_labels(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


@attrs.frozen
class Selector:
    """Every session (*everything*), or those of *agent* (any agent when ``None``)
    carrying every one of *labels* (a session may carry more)."""

    agent: str | None = None
    labels: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_labels)
    everything: bool = False

    def matches(self, agent: str, labels: Mapping[str, str]) -> bool:
        """Whether a session of *agent* with *labels* is selected."""
        if self.everything:
            return True
        return (self.agent is None or agent == self.agent) and all(
            labels.get(k) == v for k, v in self.labels.items()
        )
