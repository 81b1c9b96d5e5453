"""What the tenant registry holds: one `Binding` per tenant (its adapter and settings), validated once here for
every backend, and the errors the services map to status codes. Standard library only."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.names import NameInvalid, check_adapter_name, check_tenant_name
from reranker.limits import LimitsInvalid, TenantLimits

FORMAT = 1  # the file document's "format"
MAX_LAYER = 1023  # a sanity bound: the model's own layer count is checked when the adapter loads
_BINDING_FIELDS = ("tenant", "adapter", "layer", "fusion_weight", "limits")


class RegistryInvalid(ValueError):
    """A bad tenant or adapter name, binding or stored record (the services answer INVALID_ARGUMENT)."""


class RegistryUnavailable(RuntimeError):
    """The backend cannot be reached for a write, or the store is closed (the services answer UNAVAILABLE)."""


def check_tenant(name: object) -> str:
    """The tenant name rule (common.names), as RegistryInvalid."""
    try:
        return check_tenant_name(name)
    except NameInvalid as exc:
        raise RegistryInvalid(str(exc)) from None


@dataclass(frozen=True)
class Binding:
    """A tenant's reranker: an adapter name under the reranker's --adapters-root and its overrides. Validated when
    made (RegistryInvalid), so a Binding that exists is one every backend and replica accepts."""

    tenant: str
    adapter: str  # a name under the reranker's --adapters-root
    layer: int | None = None  # scoring layer override; None: the adapter's own
    fusion_weight: float | None = None  # 0..1 override; None: the adapter's own
    limits: TenantLimits = field(default_factory=TenantLimits)

    def __post_init__(self) -> None:
        check_tenant(self.tenant)
        try:
            check_adapter_name(self.adapter)
        except NameInvalid as exc:
            raise RegistryInvalid(str(exc)) from None
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or not 0 <= self.layer <= MAX_LAYER):
            raise RegistryInvalid(f"layer must be an integer in 0..{MAX_LAYER} or null, got {self.layer!r}")
        weight = self.fusion_weight
        if weight is not None:
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) \
                    or not 0.0 <= weight <= 1.0:
                raise RegistryInvalid(f"fusion_weight must be a number in 0..1 or null, got {weight!r}")
            object.__setattr__(self, "fusion_weight", float(weight))
        if not isinstance(self.limits, TenantLimits):
            raise RegistryInvalid(f"limits must be TenantLimits, got {type(self.limits).__name__}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, every field present (null: the default), as the file and etcd store it."""
        return {"tenant": self.tenant, "adapter": self.adapter, "layer": self.layer,
                "fusion_weight": self.fusion_weight, "limits": self.limits.to_dict()}

    @classmethod
    def from_dict(cls, data: object, tenant: str | None = None) -> Binding:
        """The inverse of to_dict. `tenant`: the name the record is stored under (a file's key, an etcd key);
        then the record may omit "tenant", and must agree with it when present. Missing optional fields are
        null; unknown fields are refused (a misspelt hand edit must not silently mean the default)."""
        if not isinstance(data, dict):
            raise RegistryInvalid(f"a binding must be an object, got {type(data).__name__}")
        _no_unknown_keys("binding", data, _BINDING_FIELDS)
        name: Any = data.get("tenant", tenant)  # checked by the constructor
        if tenant is not None and name != tenant:
            raise RegistryInvalid(f"binding stored under tenant {tenant!r} names tenant {name!r}")
        if "adapter" not in data:
            raise RegistryInvalid("a binding needs an adapter")
        return cls(tenant=name, adapter=data["adapter"], layer=data.get("layer"),
                   fusion_weight=data.get("fusion_weight"), limits=_limits(data.get("limits")))


def _no_unknown_keys(what: str, data: Mapping[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise RegistryInvalid(f"{what}: unknown field(s) {unknown}; known: {list(known)}")


# ---- serialised forms ------------------------------------------------------------------------------------------


def encode_binding(binding: Binding) -> bytes:
    """One record (an etcd value)."""
    return json.dumps(binding.to_dict(), sort_keys=True).encode()


def decode_binding(raw: bytes | str, tenant: str) -> Binding:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryInvalid(f"tenant {tenant!r}: not JSON ({exc})") from None
    try:
        return Binding.from_dict(data, tenant)
    except RegistryInvalid as exc:
        raise RegistryInvalid(f"tenant {tenant!r}: {exc}") from None


def encode_document(bindings: Mapping[str, Binding]) -> str:
    """The whole registry as one file: {"format": 1, "tenants": {name: record without "tenant"}}."""
    tenants = {name: {k: v for k, v in bindings[name].to_dict().items() if k != "tenant"}
               for name in sorted(bindings)}
    return json.dumps({"format": FORMAT, "tenants": tenants}, indent=1, sort_keys=True) + "\n"


def decode_document(text: str | bytes) -> dict[str, Binding]:
    """A file's bindings, or RegistryInvalid naming what is wrong (and where)."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RegistryInvalid(f"not JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("tenants"), dict):
        raise RegistryInvalid(f'expected {{"format": {FORMAT}, "tenants": {{NAME: BINDING, ...}}}}')
    _no_unknown_keys("document", data, ("format", "tenants"))
    bindings: dict[str, Binding] = {}
    for name, record in data["tenants"].items():
        try:
            bindings[name] = Binding.from_dict(record, name)
        except RegistryInvalid as exc:
            raise RegistryInvalid(f"tenants[{name!r}]: {exc}") from None
    return bindings


def _limits(data: object) -> TenantLimits:
    try:
        return TenantLimits.from_dict(data)
    except LimitsInvalid as exc:
        raise RegistryInvalid(str(exc)) from None
