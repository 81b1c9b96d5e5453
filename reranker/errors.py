"""Reranker errors (no heavy imports, so services/ can map them cheaply)."""


class RerankInputError(ValueError):
    """The request breaks a documented limit (INVALID_ARGUMENT)."""


class QueueFull(RuntimeError):
    """More requests are waiting than the queue holds (RESOURCE_EXHAUSTED)."""


class ExpectedLate(QueueFull):
    """Behind the work already queued, the rerank would take more of the caller's remaining time than the batcher
    allows (RESOURCE_EXHAUSTED: retrying later, or elsewhere, can succeed)."""


class TenantQueueFull(QueueFull):
    """One tenant has as many requests waiting as its limit allows (RESOURCE_EXHAUSTED); others are still admitted."""


class UnknownTenant(LookupError):
    """No adapter is loaded for this tenant (NOT_FOUND)."""


class AdapterNotFound(LookupError):
    """No adapter of that name under the server's adapters root (NOT_FOUND)."""


class AdapterInvalid(ValueError):
    """The adapter name or files cannot be served (INVALID_ARGUMENT)."""


class BudgetExceeded(RuntimeError):
    """The adapter does not fit the tenant-block memory budget (RESOURCE_EXHAUSTED)."""


class TenantUnavailable(RuntimeError):
    """A registered tenant's adapter cannot be loaded on this replica: missing or corrupt (FAILED_PRECONDITION)."""
