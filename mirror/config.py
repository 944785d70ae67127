"""Loading and validating `mirror.toml` (stdlib tomllib). Pure apart from reading the file.

Every problem becomes a ConfigError naming the file, the key and what is wrong; the CLI turns
it into one line and exit status 2. Each key's default is stated once, on its dataclass field
below; the parsers read it from there (mirror.toml documents the same values).
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import regex

from mirror.oci.errors import RegistryError
from mirror.oci.reference import Digest, parse_digest
from mirror.oci.rules import (
    Pattern,
    PatternError,
    Rules,
    UpstreamRules,
    parse_pattern,
    policy_pattern,
)

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}  # fmt: skip
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _cores() -> int:
    return os.cpu_count() or 1


class ConfigError(Exception):
    def __init__(self, path: str, key: str, message: str) -> None:
        super().__init__(f"{path}: {key}: {message}")


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    url: str
    username: str | None = None
    password: str | None = None
    credential_helper: str | None = None
    fallback_urls: tuple[str, ...] = ()  # tried in order when `url` cannot be reached
    read_timeout: float = 30.0
    connect_timeout: float = 3.0  # a cold miss fails fast when the next tier is unreachable
    max_connections: int = 16
    resume_attempts: int = 5
    access: str = "public"
    max_size: int | None = None  # its share of [cache] max_size (LRU inside it); None: none
    max_unused: float | None = None  # seconds its content may go unpulled; None: forever
    allow: tuple[str, ...] = ()  # repository patterns; empty: every repository
    deny: tuple[str, ...] = ()  # repository patterns refused (deny wins over allow)
    proxy: str | None = None  # a proxy URL or "direct"; None: the environment's (egress.py)


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 5000
    workers: int = field(default_factory=_cores)
    tls_cert: str | None = None
    tls_key: str | None = None
    shutdown_timeout: float = 30.0
    header_timeout: float = 10.0  # a request's headers must arrive within this
    keepalive_timeout: float = 75.0  # an idle keep-alive connection is closed after this
    max_connections: int = 10_000  # per worker process
    max_connections_per_client: int = 256  # per client address, per worker process
    catalog: bool = False  # /v2/_catalog lists the cached repositories (else 404)
    # X-Forwarded-For is believed from these (http/clientaddr.py)
    trusted_proxies: tuple[Network, ...] = ()


def shutdown_timeout(config: Config) -> float:
    """`[server] shutdown_timeout`; $MIRROR_SHUTDOWN_TIMEOUT overrides it (used by tests)."""
    value = os.environ.get("MIRROR_SHUTDOWN_TIMEOUT")
    return float(value) if value is not None else config.server.shutdown_timeout


MAX_SIZE = 20 * 1024**3
LOW_WATERMARK = "90%"  # of max_size, whatever max_size is set to


@dataclass(frozen=True)
class CacheConfig:
    dir: Path = Path("./cache")
    max_size: int = MAX_SIZE
    low_watermark: int = MAX_SIZE * 9 // 10  # LOW_WATERMARK of the default max_size
    tag_ttl: float = 60.0
    finish_abandoned: bool = True
    prefetch: bool = True
    offline: bool = False
    pin: tuple[str, ...] = ()


@dataclass(frozen=True)
class AccessRule:
    """An `[[auth.rule]]`: who (users, groups, anonymous clients) may pull what (`allow`:
    `<upstream>/<repository pattern>`, oci/rules.py policy_pattern), and the admin role."""

    users: tuple[str, ...] = ()  # "*": every htpasswd user
    groups: tuple[str, ...] = ()
    anonymous: bool = False  # the rule is for clients without a user (and so for everyone)
    allow: tuple[str, ...] = ()
    admin: bool = False  # purge, pin, sync now and the cache browser


@dataclass(frozen=True)
class AuthConfig:
    htpasswd: Path | None = None  # client access control is off without it
    token_lifetime: float = 300.0
    status: str = "authenticated"  # who may read / and /metrics with [auth] on
    # group -> users: [auth.groups] and the `groups_file` ("group: user user" lines) merged
    groups: Mapping[str, frozenset[str]] = field(default_factory=dict)
    rules: tuple[AccessRule, ...] = ()  # none: anonymous reads public upstreams, users all
    robots_file: Path | None = None  # robot tokens (mirror token); default <cache dir>


TAG_MATCH_SECONDS = 0.05  # a [[sync]] tags regex over one tag at most (regex timeout)
CLUSTER_SECRET_MIN = 32  # bytes in the cluster's secret file


@dataclass(frozen=True)
class ClusterConfig:
    """`[cluster]`: off (None in Config) unless the table is present."""

    node_id: str
    advertise_url: str  # how the other nodes reach this one
    secret: bytes = field(repr=False)  # read from secret_file; signs /_cluster/* requests
    peers: tuple[str, ...] = ()  # the other nodes' URLs (self and duplicates removed)
    peers_dns: str | None = None  # a name resolving to every node (a headless Service)
    health_interval: float = 2.0
    health_fails: int = 3  # failed checks in a row before a peer is down
    health_passes: int = 2  # passed checks in a row before it is up again
    peer_timeout: float = 5.0  # a silent peer: the next rank is asked after this
    peer_fill_ranks: int = 2  # the owner asks this many next-ranked peers before the upstream
    relay_cache: int = 0  # bytes of relayed blobs (owned elsewhere) kept once not in use
    # a node cut off from a blob's fill-lock holder sends its client there (307 with a
    # grant) instead of fetching the blob again; every client must reach advertise_urls
    holder_redirect: bool = False


@dataclass(frozen=True)
class RedisConfig:
    """`[redis]`: the cluster's optional shared tag cache and fill lock."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 0.05  # every Redis call: never more than this added to a request
    key_prefix: str = "mirror:"


@dataclass(frozen=True)
class S3Config:
    """`[s3]`: an optional S3-compatible bucket, the second storage tier behind the local dir."""

    endpoint: str
    bucket: str
    prefix: str = ""  # keys: <prefix>blobs/sha256/<2 hex>/<hex>
    region: str = "us-east-1"
    access_key: str | None = field(default=None, repr=False)  # None: the AWS chain
    secret_key: str | None = field(default=None, repr=False)
    path_style: bool = True  # most S3-compatible stores want it; AWS takes either
    ca_file: str | None = None  # a custom CA for TLS to the endpoint
    timeout: float = 30.0  # connect and each read
    part_size: int = 16 * 1024 * 1024  # multipart part (and the memory an upload holds)
    redirect: bool = False  # a blob only the bucket holds: 307 to a presigned URL
    max_size: int | None = None  # bytes the bucket may hold (trimmed LRU to 90%); None: no bound
    max_unused: float | None = None  # seconds an object unused (by this node) may stay


@dataclass(frozen=True)
class PolicyConfig:
    """A `[[policy]]`: manifests of the matching upstream/repository names need a signature
    that verifies with one of `keys` (checked by pull/trust.py)."""

    name: str
    match: tuple[str, ...]  # patterns over "<upstream>/<repository>" (oci/rules.py policy_pattern)
    keys: tuple[tuple[str, bytes], ...] = field(repr=False)  # (file, PEM), all valid keys
    require: str = "cosign"
    mode: str = "enforce"  # enforce | warn (logged and counted, served anyway)


WEBHOOK_EVENTS = ("pull", "fill", "evict", "upstream_down", "upstream_up", "denied")


@dataclass(frozen=True)
class WebhookConfig:
    """A `[[webhook]]`: events POSTed in the registry's notification envelope (events/)."""

    name: str  # names its queue (cache dir events/<name>) and its metrics
    url: str
    events: tuple[str, ...] = WEBHOOK_EVENTS
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    secret: bytes | None = field(default=None, repr=False)  # HMAC-SHA256 key of the body
    timeout: float = 5.0
    max_queue: int = 100_000  # events kept on disk while the receiver is away; then dropped
    max_batch: int = 100  # events per POST


@dataclass(frozen=True)
class SyncConfig:
    """A `[[sync]]` rule: the tags of `repositories` that `tags` selects, kept cached
    (pull/sync.py runs it every `interval`)."""

    name: str  # names its lock, its state in the index and `mirror sync --rule`
    upstream: str
    repositories: tuple[Pattern, ...]  # names, or patterns listed from the upstream's catalog
    tags: regex.Pattern[str] = field(compare=False)  # searched in each tag (anchor it: ^…$)
    tags_text: str = ""  # as written (compared, so a reload sees a change)
    platforms: tuple[str, ...] | None = ()  # (): this machine's, as `mirror warm`; None: all
    interval: float = 3600.0
    pin: bool = False  # what the rule selects is kept from eviction, until it no longer is
    referrers: bool = False  # also the images' signatures, attestations and SBOMs


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    upstreams: tuple[UpstreamConfig, ...] = ()
    auth: AuthConfig = field(default_factory=AuthConfig)
    cluster: ClusterConfig | None = None
    redis: RedisConfig | None = None
    policies: tuple[PolicyConfig, ...] = ()
    s3: S3Config | None = None
    webhooks: tuple[WebhookConfig, ...] = ()
    syncs: tuple[SyncConfig, ...] = ()
    path: str = "mirror.toml"
    deny_digests: tuple[Digest, ...] = ()  # [rules]: content refused through every upstream
    rules: Rules = field(default_factory=Rules)  # compiled allow/deny and deny_digests

    def upstream(self, name: str) -> UpstreamConfig | None:
        return next((u for u in self.upstreams if u.name == name), None)


def parse_size(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size like \"20GiB\", got {value!r}")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"invalid size {value!r}: use a number with B, KB, MB, GB, KiB, MiB, GiB…")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_duration(value: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a duration like \"60s\", got {value!r}")
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*", value)
    if not m:
        raise ValueError(f"invalid duration {value!r}: use e.g. 500ms, 30s, 5m, 1h, 1d")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_listen(value: object) -> tuple[str, int]:
    if not isinstance(value, str):
        raise ValueError(f"expected \"host:port\", got {value!r}")
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"invalid listen address {value!r}: expected host:port, e.g. 0.0.0.0:5000")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_url(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a URL, got {value!r}")
    parts = urlsplit(value)
    if "@" in parts.netloc:  # never echo the value: it holds a secret
        raise ValueError("credentials in the URL are refused (they would show in logs, error "
                         "messages and the status page): remove the 'user:password@' part and "
                         "set username with password, password_file or credential_helper in "
                         "this [[upstream]] table instead")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid URL {value!r}: expected http(s)://host[:port]")
    try:
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        raise ValueError(f"invalid URL {value!r}: {exc}") from None
    return value.rstrip("/")


class _Section:
    """Typed reads from one TOML table, remembering which keys were consumed."""

    def __init__(self, path: str, prefix: str, table: object) -> None:
        if not isinstance(table, dict):
            raise ConfigError(path, prefix, "expected a table")
        self.path, self.prefix, self.table = path, prefix, table
        self.used: set[str] = set()

    def get(self, key: str, default: Any, convert: Any = None, kind: type | None = None) -> Any:
        self.used.add(key)
        if key not in self.table and (default is None or convert is None):
            return default
        value = self.table.get(key, default)
        try:
            if kind is not None and (not isinstance(value, kind) or (isinstance(value, bool)
                                     and kind is not bool)):
                raise ValueError(f"expected {kind.__name__}, got {value!r}")
            return convert(value) if convert else value
        except ValueError as exc:
            raise ConfigError(self.path, f"{self.prefix}.{key}", str(exc)) from None

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.used)
        if unknown:
            raise ConfigError(self.path, f"{self.prefix}.{unknown[0]}", "unknown key")


def _positive_int(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"expected a positive integer, got {value!r}")
    return value


def _server(path: str, table: object) -> ServerConfig:
    s, d = _Section(path, "server", table), ServerConfig()
    host, port = s.get("listen", f"{d.host}:{d.port}", parse_listen)
    workers = s.get("workers", d.workers, _positive_int)
    tls_cert = s.get("tls_cert", d.tls_cert, kind=str)
    tls_key = s.get("tls_key", d.tls_key, kind=str)
    shutdown_timeout = s.get("shutdown_timeout", d.shutdown_timeout, parse_duration)
    limits = _connection_limits(path, s, d)
    catalog = s.get("catalog", d.catalog, kind=bool)
    trusted_proxies = s.get("trusted_proxies", d.trusted_proxies, _networks)
    s.finish()
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError(path, "server.tls_cert", "tls_cert and tls_key go together")
    return ServerConfig(host, port, workers, tls_cert, tls_key, shutdown_timeout, **limits,
                        catalog=catalog, trusted_proxies=trusted_proxies)


def _networks(value: object) -> tuple[Network, ...]:
    """`10.0.0.0/8`, `127.0.0.1`, `::1`: a bare address is a network of one."""
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of addresses or networks, e.g. [\"10.0.0.0/8\"]")
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in value)


def _positive_duration(value: object) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above zero, got {value!r}")
    return seconds


def _connection_limits(path: str, s: _Section, d: ServerConfig) -> dict[str, Any]:
    max_connections = s.get("max_connections", d.max_connections, _positive_int)
    explicit = "max_connections_per_client" in s.table
    per_client = s.get("max_connections_per_client", d.max_connections_per_client,
                       _positive_int)
    if explicit and per_client > max_connections:
        raise ConfigError(path, "server.max_connections_per_client",
                          f"{per_client} is above max_connections ({max_connections})")
    return {
        "header_timeout": s.get("header_timeout", d.header_timeout, _positive_duration),
        "keepalive_timeout": s.get("keepalive_timeout", d.keepalive_timeout,
                                   _positive_duration),
        "max_connections": max_connections,
        "max_connections_per_client": min(per_client, max_connections),
    }


def _watermark(value: object, max_size: int) -> int:
    if isinstance(value, str) and value.strip().endswith("%"):
        pct = float(value.strip()[:-1])
        if not 0 < pct <= 100:
            raise ValueError(f"invalid percentage {value!r}")
        return int(max_size * pct / 100)
    size = parse_size(value)
    if size > max_size:
        raise ValueError(f"{value!r} is above max_size")
    return size


def _cache(path: str, table: object, base: Path) -> CacheConfig:
    s, d = _Section(path, "cache", table), CacheConfig()
    directory = Path(s.get("dir", str(d.dir), kind=str))
    max_size = s.get("max_size", d.max_size, parse_size)
    low = s.get("low_watermark", LOW_WATERMARK, lambda v: _watermark(v, max_size))
    config = CacheConfig(
        dir=directory if directory.is_absolute() else base / directory,
        max_size=max_size,
        low_watermark=low,
        tag_ttl=s.get("tag_ttl", d.tag_ttl, parse_duration),
        finish_abandoned=s.get("finish_abandoned", d.finish_abandoned, kind=bool),
        prefetch=s.get("prefetch", d.prefetch, kind=bool),
        offline=s.get("offline", d.offline, kind=bool),
        pin=tuple(s.get("pin", list(d.pin), kind=list)),
    )
    s.finish()
    return config


def _upstream(path: str, index: int, table: object) -> UpstreamConfig:
    s, d = _Section(path, f"upstream[{index}]", table), UpstreamConfig(name="", url="")
    name = s.get("name", None, kind=str)
    url = s.get("url", None, parse_url)
    if not name:
        raise ConfigError(path, f"upstream[{index}].name",
                          "missing (the registry host, e.g. docker.io)")
    if not url:
        raise ConfigError(path, f"upstream[{index}].url",
                          "missing (e.g. https://registry-1.docker.io)")
    password = s.get("password", None, kind=str)
    password_file = s.get("password_file", None, kind=str)
    if password_file:
        try:
            password = Path(password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(path, f"upstream[{index}].password_file", str(exc)) from None
    access = s.get("access", d.access, kind=str)
    if access not in ("public", "authenticated"):
        raise ConfigError(path, f"upstream[{index}].access", "expected public or authenticated")
    config = UpstreamConfig(
        name=name,
        url=url,
        fallback_urls=tuple(u for u in s.get("fallback_urls", [], _urls) if u != url),
        username=s.get("username", d.username, kind=str),
        password=password,
        credential_helper=s.get("credential_helper", d.credential_helper, kind=str),
        read_timeout=s.get("read_timeout", d.read_timeout, parse_duration),
        connect_timeout=s.get("connect_timeout", d.connect_timeout, parse_duration),
        max_connections=s.get("max_connections", d.max_connections, _positive_int),
        resume_attempts=s.get("resume_attempts", d.resume_attempts, _positive_int),
        access=access,
        max_size=s.get("max_size", None, _positive_size),
        max_unused=s.get("max_unused", None, _positive_duration),
        allow=s.get("allow", list(d.allow), _strings),
        deny=s.get("deny", list(d.deny), _strings),
        proxy=s.get("proxy", d.proxy, _proxy_url),
    )
    s.finish()
    return config


def _proxy_url(value: object) -> str:
    if value == "direct":
        return value
    if isinstance(value, str) and "@" in urlsplit(value).netloc:
        raise ValueError("credentials in the proxy URL are refused (they would show in logs); "
                         "a proxy that needs a login is not supported yet")
    try:
        return parse_url(value)
    except ValueError:
        raise ValueError(f"expected \"direct\" or a proxy URL http(s)://host:port, got "
                         f"{value!r}") from None


def _strings(values: object) -> tuple[str, ...]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"expected a list of strings, got {values!r}")
    return tuple(values)


def _compiled_rules(path: str, upstreams: tuple[UpstreamConfig, ...],
                    deny_digests: tuple[Digest, ...]) -> Rules:
    """Every pattern validated (a bad one names its key: upstream[0].deny[2]) and compiled."""
    names = [u.name for u in upstreams]
    compiled = []
    for i, u in enumerate(upstreams):
        lists: dict[str, list[Any]] = {"allow": [], "deny": []}
        for key, patterns in lists.items():
            for j, text in enumerate(getattr(u, key)):
                try:
                    patterns.append(parse_pattern(text, u.name, names))
                except PatternError as exc:
                    raise ConfigError(path, f"upstream[{i}].{key}[{j}]", str(exc)) from None
        compiled.append(UpstreamRules(u.name, (u.url, *u.fallback_urls),
                                      tuple(lists["allow"]), tuple(lists["deny"])))
    return Rules(compiled, deny_digests)


def _deny_digests(path: str, table: object) -> tuple[Digest, ...]:
    s = _Section(path, "rules", table)
    values = s.get("deny_digests", [], _strings)
    s.finish()
    digests = []
    for j, value in enumerate(values):
        try:
            digests.append(parse_digest(value))
        except RegistryError as exc:
            raise ConfigError(path, f"rules.deny_digests[{j}]", exc.message) from None
    return tuple(dict.fromkeys(digests))


def _auth(path: str, table: object, upstreams: list[str]) -> AuthConfig:
    s, d = _Section(path, "auth", table), AuthConfig()
    htpasswd = s.get("htpasswd", None, kind=str)
    robots = s.get("robots_file", None, kind=str)
    groups_file = s.get("groups_file", None, kind=str)
    groups = _merged_groups(path, s.get("groups", {}, kind=dict), groups_file)
    config = AuthConfig(
        htpasswd=Path(htpasswd) if htpasswd else d.htpasswd,
        token_lifetime=s.get("token_lifetime", d.token_lifetime, parse_duration),
        status=s.get("status", d.status, kind=str),
        groups=groups,
        rules=_access_rules(path, s.get("rule", [], kind=list), upstreams, groups),
        robots_file=Path(robots) if robots else None,
    )
    if config.status not in ("public", "authenticated"):
        raise ConfigError(path, "auth.status", "expected public or authenticated")
    s.finish()
    if config.htpasswd is not None and not config.htpasswd.is_file():
        raise ConfigError(path, "auth.htpasswd", f"{config.htpasswd} is not a file")
    if config.rules and config.htpasswd is None:
        raise ConfigError(path, "auth.rule", "access rules need [auth] htpasswd (access "
                          "control is off without it)")
    return config


def _merged_groups(path: str, table: dict[str, object], file: str | None
                   ) -> dict[str, frozenset[str]]:
    groups: dict[str, set[str]] = {}
    for name, users in table.items():
        try:
            groups.setdefault(name, set()).update(_strings(users))
        except ValueError as exc:
            raise ConfigError(path, f"auth.groups.{name}", str(exc)) from None
    if file is not None:
        try:
            text = Path(file).read_text()
        except OSError as exc:
            raise ConfigError(path, "auth.groups_file", f"{file}: {exc.strerror or exc}"
                              ) from None
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            name, sep, users = line.partition(":")
            if not sep or not name.strip():
                raise ConfigError(path, "auth.groups_file", f"{file}:{number}: expected "
                                  "'group: user user ...'")
            groups.setdefault(name.strip(), set()).update(users.split())
    return {name: frozenset(users) for name, users in groups.items()}


def _access_rules(path: str, tables: list[object], upstreams: list[str],
                  groups: Mapping[str, frozenset[str]]) -> tuple[AccessRule, ...]:
    rules = []
    for index, table in enumerate(tables):
        s, key = _Section(path, f"auth.rule[{index}]", table), f"auth.rule[{index}]"
        rule = AccessRule(
            users=s.get("users", [], _strings), groups=s.get("groups", [], _strings),
            anonymous=s.get("anonymous", False, kind=bool),
            allow=tuple(s.get("allow", [], lambda v: _policy_patterns(v, upstreams))),
            admin=s.get("admin", False, kind=bool))
        s.finish()
        if not (rule.users or rule.groups or rule.anonymous):
            raise ConfigError(path, key, "names nobody: give users, groups or anonymous = true")
        if not (rule.allow or rule.admin):
            raise ConfigError(path, key, "grants nothing: give allow patterns or admin = true")
        if rule.anonymous and rule.admin:
            raise ConfigError(path, f"{key}.admin", "anonymous clients cannot be admins")
        unknown = [g for g in rule.groups if g not in groups]
        if unknown:
            raise ConfigError(path, f"{key}.groups", f"no group {unknown[0]!r} in [auth.groups] "
                              "or the groups_file")
        rules.append(rule)
    return tuple(rules)


def _read_secret(path: str, key: str, file: str, minimum: int = 1) -> bytes:
    try:
        secret = Path(file).read_bytes().strip()
    except OSError as exc:
        raise ConfigError(path, key, f"{file}: {exc.strerror or exc}") from None
    if len(secret) < minimum:
        raise ConfigError(path, key, f"{file} holds {len(secret)} bytes; at least {minimum} "
                          "are needed (e.g. `head -c 32 /dev/urandom | base64 > FILE`)")
    return secret


def _urls(values: object) -> tuple[str, ...]:
    if not isinstance(values, list):
        raise ValueError(f"expected a list of URLs, got {values!r}")
    return tuple(dict.fromkeys(parse_url(v) for v in values))


def _peers(advertise_url: str, values: object) -> tuple[str, ...]:
    """Peer URLs normalised: no trailing slash, no duplicates, not this node itself."""
    return tuple(url for url in _urls(values) if url != advertise_url)


def _cluster(path: str, table: object) -> ClusterConfig:
    s = _Section(path, "cluster", table)
    node_id = s.get("node_id", None, kind=str)
    if not node_id:
        raise ConfigError(path, "cluster.node_id", "missing: every node needs its own name "
                          "(e.g. the host name); it decides which digests it owns")
    advertise_url = s.get("advertise_url", None, parse_url)
    if not advertise_url:
        raise ConfigError(path, "cluster.advertise_url",
                          "missing (the URL the other nodes reach this one at)")
    secret_file = s.get("secret_file", None, kind=str)
    if not secret_file:
        raise ConfigError(path, "cluster.secret_file",
                          "missing (a file of random bytes every node shares)")
    peers = s.get("peers", [], lambda v: _peers(advertise_url, v))
    peers_dns = s.get("peers_dns", None, kind=str)
    d = ClusterConfig(node_id, advertise_url, b"")
    config = ClusterConfig(
        node_id=node_id, advertise_url=advertise_url,
        secret=_read_secret(path, "cluster.secret_file", secret_file, CLUSTER_SECRET_MIN),
        peers=peers, peers_dns=peers_dns or None,
        health_interval=s.get("health_interval", d.health_interval, _positive_duration),
        health_fails=s.get("health_fails", d.health_fails, _positive_int),
        health_passes=s.get("health_passes", d.health_passes, _positive_int),
        peer_timeout=s.get("peer_timeout", d.peer_timeout, _positive_duration),
        peer_fill_ranks=s.get("peer_fill_ranks", d.peer_fill_ranks, _positive_int),
        relay_cache=s.get("relay_cache", d.relay_cache, parse_size),
        holder_redirect=s.get("holder_redirect", d.holder_redirect, kind=bool),
    )
    s.finish()
    return config


def _redis(path: str, table: object) -> RedisConfig:
    s = _Section(path, "redis", table)
    url = s.get("url", None, kind=str)
    if not url or urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(path, "redis.url", "expected redis://host:port/db (or rediss://)")
    if "@" in urlsplit(url).netloc:
        raise ConfigError(path, "redis.url", "credentials in the URL are refused (they would "
                          "show in logs): set username and password_file instead")
    password_file = s.get("password_file", None, kind=str)
    d = RedisConfig(url)
    config = RedisConfig(
        url=url, username=s.get("username", None, kind=str),
        password=_read_secret(path, "redis.password_file", password_file).decode()
        if password_file else None,
        timeout=s.get("timeout", d.timeout, _positive_duration),
        key_prefix=s.get("key_prefix", d.key_prefix, kind=str),
    )
    s.finish()
    return config


def _s3(path: str, table: object) -> S3Config:
    s = _Section(path, "s3", table)
    endpoint = s.get("endpoint", None, parse_url)
    bucket = s.get("bucket", None, kind=str)
    if not endpoint:
        raise ConfigError(path, "s3.endpoint", "missing (e.g. https://s3.example:8333)")
    if not bucket:
        raise ConfigError(path, "s3.bucket", "missing: the bucket's name")
    d = S3Config(endpoint, bucket)
    keys = {}
    for key in ("access_key", "secret_key"):
        value, file = s.get(key, None, kind=str), s.get(f"{key}_file", None, kind=str)
        keys[key] = _read_secret(path, f"s3.{key}_file", file).decode() if file else value
    if (keys["access_key"] is None) != (keys["secret_key"] is None):
        raise ConfigError(path, "s3.secret_key", "set both access_key and secret_key (or "
                          "their _file keys), or neither for the AWS environment and profile")
    prefix = s.get("prefix", d.prefix, kind=str)
    if prefix.startswith("/") or ".." in prefix.split("/"):
        raise ConfigError(path, "s3.prefix", f"{prefix!r}: expected a relative key prefix")
    config = S3Config(
        endpoint=endpoint, bucket=bucket, prefix=prefix,
        region=s.get("region", d.region, kind=str),
        access_key=keys["access_key"], secret_key=keys["secret_key"],
        path_style=s.get("path_style", d.path_style, kind=bool),
        ca_file=s.get("ca_file", d.ca_file, kind=str),
        timeout=s.get("timeout", d.timeout, _positive_duration),
        part_size=s.get("part_size", d.part_size, _part_size),
        redirect=s.get("redirect", d.redirect, kind=bool),
        max_size=s.get("max_size", d.max_size, _positive_size),
        max_unused=s.get("max_unused", d.max_unused, _positive_duration),
    )
    s.finish()
    if config.ca_file is not None and not Path(config.ca_file).is_file():
        raise ConfigError(path, "s3.ca_file", f"{config.ca_file} is not a file")
    return config


def _positive_size(value: object) -> int:
    size = parse_size(value)
    if size <= 0:
        raise ValueError("expected a size above 0 (or leave the key out: no bound)")
    return size


def _part_size(value: object) -> int:
    size = parse_size(value)
    if not 5 * 1024**2 <= size <= 5 * 1024**3:
        raise ValueError("S3 parts are 5 MiB to 5 GiB")
    return size


def _unique(path: str, table: str, what: str, names: list[str], why: str = "") -> None:
    """Each [[table]]'s name once."""
    if len(set(names)) != len(names):
        raise ConfigError(path, f"{table}.name", f"duplicate {what} names in {names}{why}")


def load_config(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(p), "-",
                          "file not found (pass --config or set MIRROR_CONFIG)") from None
    except OSError as exc:
        raise ConfigError(str(p), "-", exc.strerror or str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(p), "-", f"not valid TOML: {exc}") from None
    return parse_config(data, str(p), Path.cwd())


def parse_config(data: dict[str, Any], path: str = "mirror.toml", base: Path = Path()) -> Config:
    unknown = sorted(set(data) - {"server", "cache", "upstream", "auth", "cluster", "redis",
                                  "s3", "policy", "rules", "webhook", "sync"})
    if unknown:
        raise ConfigError(path, unknown[0], "unknown section")
    raw_upstreams = data.get("upstream", [])
    if not isinstance(raw_upstreams, list) or not raw_upstreams:
        raise ConfigError(path, "upstream", "at least one [[upstream]] table is needed")
    upstreams = tuple(_upstream(path, i, t) for i, t in enumerate(raw_upstreams))
    names = [u.name for u in upstreams]
    _unique(path, "upstream", "upstream", names)
    cache = _cache(path, data.get("cache", {}), base)
    for i, u in enumerate(upstreams):
        if u.max_size is not None and u.max_size > cache.max_size:
            raise ConfigError(path, f"upstream[{i}].max_size", f"{u.max_size} bytes is more "
                              f"than [cache] max_size ({cache.max_size}): a share is within it")
    deny_digests = _deny_digests(path, data.get("rules", {}))
    return Config(
        server=_server(path, data.get("server", {})),
        cache=cache,
        upstreams=upstreams,
        auth=_auth(path, data.get("auth", {}), names),
        cluster=_cluster(path, data["cluster"]) if "cluster" in data else None,
        redis=_redis(path, data["redis"]) if "redis" in data else None,
        s3=_s3(path, data["s3"]) if "s3" in data else None,
        policies=_policies(path, data.get("policy", []), names),
        webhooks=_webhooks(path, data.get("webhook", [])),
        syncs=_syncs(path, data.get("sync", []), names),
        path=path,
        deny_digests=deny_digests,
        rules=_compiled_rules(path, upstreams, deny_digests),
    )


def _policies(path: str, tables: object, upstreams: list[str]) -> tuple[PolicyConfig, ...]:
    if not isinstance(tables, list):
        raise ConfigError(path, "policy", "expected [[policy]] tables")
    policies = tuple(_policy(path, i, t, upstreams) for i, t in enumerate(tables))
    _unique(path, "policy", "policy", [p.name for p in policies])
    return policies


def _policy(path: str, index: int, table: object, upstreams: list[str]) -> PolicyConfig:
    s = _Section(path, f"policy[{index}]", table)
    name = s.get("name", f"policy[{index}]", kind=str)
    match = tuple(s.get("match", None, lambda v: _policy_patterns(v, upstreams)))
    if not match:
        raise ConfigError(path, f"policy[{index}].match", "missing: the names it applies to, "
                          'e.g. ["docker.io/library/*"]')
    require = s.get("require", "cosign", kind=str)
    if require != "cosign":
        raise ConfigError(path, f"policy[{index}].require", f"{require!r}: expected cosign")
    mode = s.get("mode", "enforce", kind=str)
    if mode not in ("enforce", "warn"):
        raise ConfigError(path, f"policy[{index}].mode", f"{mode!r}: expected enforce or warn")
    files = s.get("keys", None, kind=list)
    if not files or not all(isinstance(f, str) for f in files):
        raise ConfigError(path, f"policy[{index}].keys", "expected a list of PEM public key "
                          "files")
    keys = tuple((f, _public_key(path, f"policy[{index}].keys", f)) for f in files)
    s.finish()
    return PolicyConfig(name, match, keys, require, mode)


def _policy_patterns(value: object, upstreams: list[str]) -> list[str]:
    """`<upstream>/<repository pattern>` each (oci/rules.py's patterns)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of patterns, got {value!r}")
    for pattern in value:
        policy_pattern(pattern, upstreams)  # raises ValueError naming the bad one
    return value


def _public_key(path: str, key: str, file: str) -> bytes:
    try:
        pem = Path(file).read_bytes()
    except OSError as exc:
        raise ConfigError(path, key, f"{file}: {exc.strerror or exc}") from None
    from mirror.oci.cosign import load_public_key  # cryptography: only a [[policy]] pays for it

    try:
        load_public_key(pem)
    except ValueError as exc:
        raise ConfigError(path, key, f"{file}: {exc}") from None
    return pem


def _webhooks(path: str, tables: object) -> tuple[WebhookConfig, ...]:
    if not isinstance(tables, list):
        raise ConfigError(path, "webhook", "expected [[webhook]] tables")
    hooks = tuple(_webhook(path, i, t) for i, t in enumerate(tables))
    _unique(path, "webhook", "webhook", [h.name for h in hooks], ": each names its own queue")
    return hooks


def _webhook(path: str, index: int, table: object) -> WebhookConfig:
    key = f"webhook[{index}]"
    s, d = _Section(path, key, table), WebhookConfig(name="", url="")
    url = s.get("url", None, parse_url)
    if not url:
        raise ConfigError(path, f"{key}.url", "missing (e.g. https://hooks.example/registry)")
    name = s.get("name", urlsplit(url).hostname or "", _webhook_name)
    secret = s.get("secret", None, kind=str)
    secret_file = s.get("secret_file", None, kind=str)
    if secret is not None and secret_file is not None:
        raise ConfigError(path, f"{key}.secret_file", "give secret or secret_file, not both")
    config = WebhookConfig(
        name=name,
        url=url,
        events=s.get("events", list(d.events), _webhook_events),
        headers=s.get("headers", {}, _headers),
        secret=_read_secret(path, f"{key}.secret_file", secret_file) if secret_file
        else (secret.encode() if secret else None),
        timeout=s.get("timeout", d.timeout, _positive_duration),
        max_queue=s.get("max_queue", d.max_queue, _positive_int),
        max_batch=s.get("max_batch", d.max_batch, _positive_int),
    )
    s.finish()
    return config


def _webhook_name(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
        raise ValueError(f"expected a name of letters, digits, '.', '_' or '-', got {value!r}")
    return value


def _webhook_events(value: object) -> tuple[str, ...]:
    events = _strings(value)
    unknown = [e for e in events if e not in WEBHOOK_EVENTS]
    if unknown or not events:
        what = f"unknown event {unknown[0]!r}" if unknown else "no events listed"
        raise ValueError(f"{what}: expected some of {', '.join(WEBHOOK_EVENTS)}")
    return tuple(dict.fromkeys(events))


def _headers(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"expected a table of header names to strings, got {value!r}")
    for name, text in value.items():
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name) or any(
                c in text for c in "\r\n\0"):
            raise ValueError(f"invalid header {name!r}")
    return tuple(value.items())


def _syncs(path: str, tables: object, upstreams: list[str]) -> tuple[SyncConfig, ...]:
    if not isinstance(tables, list):
        raise ConfigError(path, "sync", "expected [[sync]] tables")
    rules = tuple(_sync(path, i, t, upstreams) for i, t in enumerate(tables))
    _unique(path, "sync", "sync rule", [r.name for r in rules],
            ": each names its own lock and state")
    return rules


def _sync(path: str, index: int, table: object, upstreams: list[str]) -> SyncConfig:
    key = f"sync[{index}]"
    s, d = _Section(path, key, table), SyncConfig("", "", (), regex.compile(""))
    upstream = s.get("upstream", None, kind=str)
    if upstream not in upstreams:
        raise ConfigError(path, f"{key}.upstream", f"{upstream!r}: expected the name of an "
                          f"[[upstream]] ({', '.join(upstreams)})" if upstream is not None
                          else "missing: the [[upstream]] whose images it keeps")
    repositories = s.get("repositories", None,
                         lambda v: _sync_repositories(v, upstream, upstreams))
    if not repositories:
        raise ConfigError(path, f"{key}.repositories", 'missing: e.g. ["library/nginx"]')
    tags_text = s.get("tags", None, kind=str)
    if tags_text is None:
        raise ConfigError(path, f"{key}.tags", "missing: a regular expression over the "
                          r"upstream's tags, e.g. '^1\.27(\.\d+)?$' ('.' selects every tag)")
    config = SyncConfig(
        name=s.get("name", f"sync-{index + 1}", _webhook_name),
        upstream=upstream,
        repositories=repositories,
        tags=s.get("tags", None, _regex),
        tags_text=tags_text,
        platforms=s.get("platforms", list(d.platforms or ()), _platforms),
        interval=s.get("interval", d.interval, _positive_duration),
        pin=s.get("pin", d.pin, kind=bool),
        referrers=s.get("referrers", d.referrers, kind=bool),
    )
    s.finish()
    return config


def _sync_repositories(value: object, upstream: str, upstreams: list[str]
                       ) -> tuple[Pattern, ...]:
    try:
        return tuple(parse_pattern(v, upstream, upstreams) for v in _strings(value))
    except PatternError as exc:
        raise ValueError(str(exc)) from None


def _regex(value: object) -> regex.Pattern[str]:
    assert isinstance(value, str)
    try:
        return regex.compile(value)
    except regex.error as exc:
        raise ValueError(f"{value!r} is not a valid regular expression: {exc}") from None


def _platforms(value: object) -> tuple[str, ...] | None:
    if value == "all":
        return None
    platforms = _strings(value)
    for p in platforms:
        if not re.fullmatch(r"[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?", p):
            raise ValueError(f"{p!r}: expected os/architecture[/variant], e.g. linux/arm64/v8, "
                             'or "all"')
    return platforms
