"""Who a call is from. With a keys file (`--keys-file`), every RPC but health and reflection needs
`authorization: Bearer <key>` (UNAUTHENTICATED without a valid one); the key's tenant is the caller, never a
request field. Two callers may name another tenant in the `x-retrieval-tenant` header:

- an admin key, to address that tenant's resources explicitly;
- a trusted forwarder (`--trusted-forwarders`, the common names of client certificates the server's client CA
  signed: the gateway), which authenticated the caller itself and forwards its tenant over mutual TLS.

Admin-only RPCs answer PERMISSION_DENIED to tenant keys. Without a keys file the service is open, as before:
every call is the default tenant (""), and request fields name tenants. Handlers read the caller with
`principal()`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from contextvars import ContextVar
from typing import Any

import grpc

from common.names import is_tenant_name
from services.errors import ServiceError, rewrapped
from services.keys import KeysFile, Principal

TENANT_HEADER = "x-retrieval-tenant"
OPEN = Principal("", admin=True)  # no keys file: everyone may do everything, as before authentication existed
_PRINCIPAL: ContextVar[Principal] = ContextVar("principal", default=OPEN)
# Always open: load balancers and operators probe health; reflection describes the API, not data.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def principal() -> Principal:
    """The caller of the RPC being handled (OPEN when authentication is off)."""
    return _PRINCIPAL.get()


def authenticated() -> bool:
    return _PRINCIPAL.get() is not OPEN


def acting_tenant(requested: str) -> str:
    """The tenant a request acts for: with authentication, the caller's (a request's tenant field must be empty or
    name it; an admin may name any tenant); without, the request's field."""
    caller = principal()
    if caller is OPEN or not requested:
        return requested if caller is OPEN else caller.tenant
    if requested != caller.tenant and not caller.admin:
        raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, "the request's tenant is not the credential's")
    return requested


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: KeysFile, admin_methods: Collection[str] = (), forwarders: Collection[str] = ()) -> None:
        self.keys = keys
        self.admin_methods = frozenset(admin_methods)  # full method names, "/pkg.Service/Method"
        self.forwarders = frozenset(forwarders)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or method.startswith(PUBLIC_PREFIXES):
            return handler
        behavior = handler.unary_unary

        async def authorised(request: Any, context: grpc.aio.ServicerContext) -> Any:
            caller = self._caller(context)
            if method in self.admin_methods and not caller.admin:
                raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, f"{method.rsplit('/', 1)[-1]} needs an admin key")
            token = _PRINCIPAL.set(caller)
            try:
                return await behavior(request, context)
            finally:
                _PRINCIPAL.reset(token)

        return rewrapped(handler, authorised)

    def _caller(self, context: grpc.aio.ServicerContext) -> Principal:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        forwarded = metadata.get(TENANT_HEADER)
        if forwarded is not None and self._from_forwarder(context):
            return Principal(_tenant_header(forwarded))
        caller = self._bearer(metadata.get("authorization", ""))  # first: the unauthenticated learn nothing more
        if forwarded is None:
            return caller
        if not caller.admin:
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                               f"{TENANT_HEADER} is accepted only with an admin key or from a trusted forwarder")
        return Principal(_tenant_header(forwarded), admin=True, key_id=caller.key_id)

    def _bearer(self, header: str) -> Principal:
        scheme, _, key = header.partition(" ")
        caller = self.keys.authenticate(key.strip()) if scheme.lower() == "bearer" else None
        if caller is None:  # one answer for missing, malformed, unknown, revoked and expired keys
            raise ServiceError(grpc.StatusCode.UNAUTHENTICATED, "a valid API key is required "
                                                                "(authorization: Bearer <key>)")
        return caller

    def _from_forwarder(self, context: grpc.aio.ServicerContext) -> bool:
        """The peer showed a client certificate (verified against --tls-client-ca) with a trusted common name."""
        if not self.forwarders:
            return False
        names = context.auth_context().get("x509_common_name", [])
        return any(n.decode(errors="replace") in self.forwarders for n in names)


def _tenant_header(value: str) -> str:
    if not is_tenant_name(value):
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{TENANT_HEADER} is not a tenant name")
    return value


def tenant_metadata(tenant: str) -> tuple[tuple[str, str], ...]:
    """What a forwarder (the gateway) sends its downstreams: the caller's tenant."""
    return ((TENANT_HEADER, tenant),) if tenant else ()
