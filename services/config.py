"""One frozen dataclass per service, nesting its engines' configs; the command line and the
environment are generated from it (as vLLM's EngineArgs and Infinity's settings do).

Every leaf field becomes a flag, `--field-name` (nested configs are flattened: their field names are
already unique within a service), with an environment variable beside it, `<PREFIX>_FIELD_NAME`; the
flag wins over the variable, the variable over the dataclass default. Help comes from the field's
`help` metadata. A `Secret` field is never printed: `describe` and every repr show it masked.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import inspect
import os
import textwrap
import typing
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from common.allocator import SERVICE_ARENAS

C = TypeVar("C")


class Secret:
    """A string that must never reach a log, an error message or a config dump."""

    __slots__ = ("_value",)

    def __init__(self, value: str = "") -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('****')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str = "",
           factory: Callable[[], Any] | None = None) -> Any:
    """A config field with its help text (and, rarely, a flag name that differs from the field's)."""
    metadata = {"help": help, "flag": flag}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """What every service process has: where it listens and how it shuts down."""

    host: str = option("127.0.0.1", "address to listen on (0.0.0.0 in containers)")
    port: int = option(0, "port to listen on")
    grace_s: float = option(10.0, "on SIGTERM, seconds in-flight calls get to finish")
    worker_threads: int = option(2, "threads for blocking work (tokenising, indexing, adapter loads)")
    cpu_threads: int = option(0, "torch threads of the model on a CPU (the retriever's embedder, the reranker); 0: "
                                 "OMP_NUM_THREADS when set, else the cores this process may use (its affinity, "
                                 "within its cgroup's CPU limit: a container's limit, not the node's cores)")
    metrics_port: int = option(0, "port of the Prometheus /metrics endpoint, on the same host; 0: off")
    health_port: int = option(0, "plaintext port serving only the standard health service, on the same host (for "
                                 "probes that cannot present a client certificate, such as Kubernetes' gRPC "
                                 "probes); 0: off")
    malloc_arenas: int = option(SERVICE_ARENAS, "glibc malloc arenas (common.allocator: fewer keep freed memory "
                                                "from staying resident); 0: glibc's default; MALLOC_ARENA_MAX, "
                                                "when set, wins")
    malloc_keep_mb: int = option(0, "MiB of freed memory glibc keeps for reuse, with blocks up to 32 MiB from its "
                                    "heap (common.allocator: a CPU reranker's layers then reuse each other's "
                                    "activations instead of page-faulting them back); 0: glibc's adaptive "
                                    "thresholds; MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_, when set, wins")
    tls_cert: str = option("", "PEM certificate chain: serve TLS only (with --tls-key; reloaded on SIGHUP)")
    tls_key: str = option("", "PEM private key of --tls-cert (keep it mode 600)")
    tls_client_ca: str = option("", "PEM CA: require client certificates it signed (mutual TLS)")
    keys_file: str = option("", "per-tenant API keys (python -m services.keys): every call needs one; "
                                "empty: no authentication")
    trusted_forwarders: str = option("", "common names of client certificates (signed by --tls-client-ca) whose "
                                         "x-retrieval-tenant header is believed: the gateway's, comma-separated")
    otlp_endpoint: str = option("", "OTLP/gRPC receiver of this process's traces (http://collector:4317); empty: "
                                    "OTEL_EXPORTER_OTLP_ENDPOINT when set, else tracing off")
    trace_sample_ratio: float = option(1.0, "share of root requests traced (parent-based: a caller's sampled "
                                            "traceparent is always followed); OTEL_TRACES_SAMPLER, when set, wins")
    log_format: str = option("text", "log lines as text (a terminal) or json (one object per line, with the "
                                     "trace and span ids of the request)")


@dataclasses.dataclass(frozen=True)
class _Leaf:
    path: tuple[str, ...]  # attribute path from the service config, e.g. ("engine", "max_documents")
    field: dataclasses.Field[Any]
    kind: Any  # the resolved type
    value: Any  # in the config it was read from (the service's defaults when building the parser)
    comment: str = ""

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def flag(self) -> str:
        return str(self.field.metadata.get("flag") or "--" + self.name.replace("_", "-"))

    @property
    def dest(self) -> str:
        return "__".join(self.path)


def field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field line in a dataclass's source: engine configs document
    their fields that way, and stay free of any services/ helper."""
    try:
        lines, _ = inspect.getsourcelines(cls)
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError):
        return {}
    comments = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = lines[node.end_lineno - 1] if node.end_lineno else ""
            if "#" in line:
                comments[node.target.id] = line.split("#", 1)[1].strip()
    return comments


def _leaves(config: Any, path: tuple[str, ...] = ()) -> Iterator[_Leaf]:
    hints = typing.get_type_hints(type(config))
    comments = field_comments(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, (*path, f.name))
        else:
            yield _Leaf((*path, f.name), f, hints[f.name], value, comments.get(f.name, ""))


def _converter(kind: Any) -> Callable[[str], Any]:
    """How one string (a flag or an environment variable) becomes the field's type."""
    if kind is bool:
        return lambda text: text.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        return kind
    if kind is Secret:
        return Secret
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        return lambda text: tuple(item(part) for part in text.split(",") if part.strip())
    if kind in (int, float, str):
        return typing.cast(Callable[[str], Any], kind)
    raise TypeError(f"config fields of type {kind!r} have no command-line form")


def _add_flag(parser: argparse.ArgumentParser, leaf: _Leaf, env_prefix: str) -> None:
    env = f"{env_prefix}_{leaf.name.upper()}"
    convert = _converter(leaf.kind)
    default = leaf.value
    if env in os.environ:
        try:
            default = convert(os.environ[env])
        except ValueError:  # the value itself is not repeated: it may be a secret in the wrong variable
            raise SystemExit(f"environment variable {env} is not a valid {leaf.flag} value") from None
    shown = "(empty)" if default in ("", ()) else (default.value if isinstance(default, enum.Enum) else default)
    own = leaf.field.metadata.get("help") or leaf.comment
    help_text = f"{own} [env {env}; default {shown}]".strip()
    kwargs: dict[str, Any] = {"dest": leaf.dest, "default": default, "help": help_text}
    if leaf.kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["type"] = convert
        if isinstance(leaf.kind, type) and issubclass(leaf.kind, enum.Enum):
            kwargs["choices"] = list(leaf.kind)
            kwargs["metavar"] = "{" + ",".join(m.value for m in leaf.kind) + "}"
    parser.add_argument(leaf.flag, **kwargs)


def build_parser(default: Any, env_prefix: str, description: str = "") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    seen: dict[str, tuple[str, ...]] = {}
    for leaf in _leaves(default):
        if leaf.flag in seen:
            raise TypeError(f"{leaf.flag} is defined by both {seen[leaf.flag]} and {leaf.path}")
        seen[leaf.flag] = leaf.path
        _add_flag(parser, leaf, env_prefix)
    return parser


def parse_config(default: C, env_prefix: str, argv: list[str] | None = None, description: str = "") -> C:
    """The service config from `argv` (default: sys.argv) and the environment, over `default`."""
    namespace = vars(build_parser(default, env_prefix, description).parse_args(argv))
    return _rebuild(default, (), namespace)


def _rebuild(config: C, path: tuple[str, ...], namespace: dict[str, Any]) -> C:
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        key = (*path, f.name)
        changes[f.name] = _rebuild(value, key, namespace) if dataclasses.is_dataclass(value) \
            else namespace["__".join(key)]
    return dataclasses.replace(config, **changes)  # type: ignore[type-var]


def describe(config: Any) -> str:
    """`a=1 engine.b='x' token=Secret('****')`: every leaf, secrets masked, for the start-up log."""
    parts = []
    for leaf in _leaves(config):
        value = leaf.value.value if isinstance(leaf.value, enum.Enum) else leaf.value
        parts.append(f"{'.'.join(leaf.path)}={value!r}")
    return " ".join(parts)
