"""Per-tenant limits on the reranker's shared batches. Standard library only: the tenant registry
(reranker.registry) stores them with each binding, and the batcher applies them."""

from __future__ import annotations

from dataclasses import dataclass

MAX_LIMIT = 1_000_000  # a sanity bound on either limit
_FIELDS = ("max_queued", "max_inflight")


class LimitsInvalid(ValueError):
    """A limit that is not a positive integer up to MAX_LIMIT, or a record with unknown fields (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class TenantLimits:
    """None: the serving process's default (BatcherConfig.tenant_max_queued / tenant_max_inflight)."""

    max_queued: int | None = None  # the tenant's requests waiting for a batch; more are refused at once
    max_inflight: int | None = None  # the tenant's requests in one forward pass

    def __post_init__(self) -> None:
        for name in _FIELDS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 1 <= value <= MAX_LIMIT):
                raise LimitsInvalid(f"limits.{name} must be an integer in 1..{MAX_LIMIT} or null, got {value!r}")

    def to_dict(self) -> dict[str, int | None]:
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_dict(cls, data: object) -> TenantLimits:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise LimitsInvalid(f"limits must be an object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise LimitsInvalid(f"limits has unknown fields {unknown}; known: {list(_FIELDS)}")
        return cls(max_queued=data.get("max_queued"), max_inflight=data.get("max_inflight"))
