"""Reranker errors (no heavy imports, so services/ can map them cheaply)."""


class RerankInputError(ValueError):
    """The request breaks a documented limit (INVALID_ARGUMENT)."""


class QueueFull(RuntimeError):
    """More requests are waiting than the queue holds (RESOURCE_EXHAUSTED)."""


class UnknownTenant(LookupError):
    """No adapter is loaded for this tenant (NOT_FOUND)."""
