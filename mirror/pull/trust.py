"""Signature policies (`[[policy]]`): a manifest of a matching name is served only when a
cosign signature on its digest verifies with one of the policy's keys.

The signatures are looked up through the proxy, so they are cached like any content (a tag
trusted for tag_ttl, then revalidated; served stale and offline): cosign's tag
`sha256-<hex>.sig`, and referrers of cosign's signature artifact type. A verdict is kept:
an allowed digest in the index (every worker, across restarts), keyed by the policy's
fingerprint (its patterns and keys: another policy file is checked again); a denial in
memory for tag_ttl (a signature may be pushed after the image). An allowed index covers the
platform manifests and blobs it references, an allowed image its config and layers, so a
client's next requests, by digest, need no signature of their own. A blob under a policy is
served only when an allowed manifest covers it. What is attached to images (signatures,
attestations, SBOMs: manifests without a filesystem layer) is not an image and is served.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cachetools import LRUCache, TTLCache

from mirror import metrics
from mirror.cache.index import Index
from mirror.config import PolicyConfig
from mirror.oci import mediatypes as mt
from mirror.oci.cosign import (
    MAX_PAYLOAD,
    SIGNATURE_ARTIFACT,
    BadSignature,
    PublicKey,
    SignedLayer,
    load_public_key,
    payload_digest,
    signed_layers,
    verifies,
)
from mirror.oci.errors import ErrorCode, RegistryError
from mirror.oci.reference import Digest, parse_digest
from mirror.oci.referrers import fallback_tags
from mirror.oci.rules import policy_pattern
from mirror.pull.proxy import Manifest, Proxy
from mirror.pull.source import Source

log = logging.getLogger("mirror.policy")

SIGNATURE_ACCEPT = (mt.OCI_MANIFEST, mt.DOCKER_MANIFEST)
ABSENT = frozenset({ErrorCode.MANIFEST_UNKNOWN, ErrorCode.NAME_UNKNOWN})
ABSENT_BLOB = frozenset({ErrorCode.BLOB_UNKNOWN, ErrorCode.NAME_UNKNOWN})
MAX_SIGNATURE_MANIFEST = 4 << 20  # distribution refuses a bigger manifest; never parsed
MAX_SIGNATURES = 16  # signature manifests (and payloads in each) looked at per digest
UNPACKED_PREFIXES = ("application/vnd.oci.image", "application/vnd.docker")
UNPACKED_TYPES = frozenset({"", "application/octet-stream", "application/json", "text/html"})


class _TooBig(ValueError):
    """A payload blob bigger than MAX_PAYLOAD (its size), whatever its descriptor says."""


@dataclass(frozen=True)
class Policy:
    name: str
    fingerprint: str  # what a kept verdict was decided under
    keys: tuple[PublicKey, ...]
    enforce: bool

    @classmethod
    def of(cls, config: PolicyConfig) -> Policy:
        h = hashlib.sha256("\0".join((config.name, config.require, *config.match)).encode())
        for _, pem in config.keys:
            h.update(b"\0" + pem)
        return cls(config.name, h.hexdigest()[:32],
                   tuple(load_public_key(pem) for _, pem in config.keys),
                   config.mode == "enforce")


class Trust:
    """Used by: http/content.py (check_manifest before a manifest is answered, check_blob
    before a blob is), runtime (built from the configuration)."""

    def __init__(self, policies: Sequence[PolicyConfig], upstreams: Sequence[str],
                 proxy: Proxy, index: Index, tag_ttl: float) -> None:
        self.proxy, self.index = proxy, index
        self._policies = [([policy_pattern(m, upstreams) for m in p.match], Policy.of(p))
                          for p in policies]
        self._matched: LRUCache[tuple[str, str], Policy | None] = LRUCache(4096)
        self._allowed: LRUCache[tuple[str, Digest], bool] = LRUCache(65536)
        self._denied: TTLCache[tuple[str, Digest], str] = TTLCache(4096, tag_ttl)
        # manifests allowed with what they reference covered: a hit costs two lookups
        self._settled: LRUCache[tuple[str, Digest], bool] = LRUCache(65536)
        self._counters: dict[tuple[str, str], Any] = {}

    def policy_for(self, upstream: str, repository: str) -> Policy | None:
        """The first policy whose patterns match `<upstream>/<repository>`."""
        key = (upstream, repository)
        if key not in self._matched:
            self._matched[key] = next(
                (policy for patterns, policy in self._policies
                 if any(u == upstream and p.matches(repository) for u, p in patterns)), None)
        return self._matched[key]

    def settled(self, source: Source, repository: str, m: Manifest) -> bool:
        """Whether `m` needs no check (no policy, or allowed with what it references covered):
        a manifest hit's whole cost, two lookups and no coroutine."""
        policy = self.policy_for(source.name, repository)
        return policy is None or (m.data is not None
                                  and (policy.fingerprint, m.digest) in self._settled)

    async def check_manifest(self, source: Source, repository: str, m: Manifest) -> None:
        policy, reason = await self.decide(source, repository, m)
        if policy is not None and reason is not None:
            self._refuse(policy, source, repository, m.digest, reason)

    async def decide(self, source: Source, repository: str, m: Manifest
                     ) -> tuple[Policy | None, str | None]:
        """(the policy that applies, why it refuses `m` or None)."""
        policy = self.policy_for(source.name, repository)
        if policy is None:
            return None, None
        settled = (policy.fingerprint, m.digest)
        if m.data is not None and settled in self._settled:
            return policy, None
        if m.data is not None and _is_attached_artifact(m.media_type, m.data):
            self._cover(policy, m.data)  # its blobs, for the client that reads them next
            self._settled[settled] = True
            return policy, None
        reason = await self._verdict(policy, source, repository, m.digest)
        if reason is None and m.data is not None:
            self._cover(policy, m.data)
            self._settled[settled] = True
            if m.cache == "miss":  # held back by the proxy until now
                self.proxy.prefetch(source, repository, m.media_type, m.data)
        return policy, reason

    def holds(self, upstream: str, repository: str) -> bool:
        """Used by: the proxy, whose prefetch of a policed name waits for decide()."""
        return self.policy_for(upstream, repository) is not None

    def check_blob(self, source: Source, repository: str, digest: Digest) -> None:
        policy = self.policy_for(source.name, repository)
        if policy is None or self._is_allowed(policy, digest):
            return
        self._refuse(policy, source, repository, digest, "no manifest this mirror allowed "
                     "references this blob (pull the image by its tag or digest first)")

    def _counted(self, policy: Policy, decision: str) -> Any:
        """The decision's counter, its labels looked up once (a manifest hit counts too)."""
        key = (policy.name, decision)
        if key not in self._counters:
            self._counters[key] = metrics.POLICY_DECISIONS.labels(policy.name, decision)
        return self._counters[key]

    # verdicts -----------------------------------------------------------------------------
    def _is_allowed(self, policy: Policy, digest: Digest) -> bool:
        key = (policy.fingerprint, digest)
        if key in self._allowed:
            return True
        if self.index.is_trusted(policy.fingerprint, digest):
            self._allowed[key] = True
            return True
        return False

    def _allow(self, policy: Policy, digest: Digest) -> None:
        self._allowed[(policy.fingerprint, digest)] = True
        self.index.set_trusted(policy.fingerprint, digest)

    async def _verdict(self, policy: Policy, source: Source, repository: str,
                       digest: Digest) -> str | None:
        """None when `digest` is allowed, else why not."""
        if self._is_allowed(policy, digest):
            return None
        key = (policy.fingerprint, digest)
        if key in self._denied:
            return self._denied[key]
        metrics.SIGNATURE_LOOKUPS.labels(policy.name).inc()
        reason, final = await self._verify(policy, source, repository, digest)
        if reason is None:
            self._allow(policy, digest)
            self._counted(policy, "allowed").inc()
            log.info("signature verified", extra={
                "policy": policy.name, "upstream": source.name, "repository": repository,
                "digest": str(digest)})
        elif final:
            self._denied[key] = reason
            self.index.record_denial(policy.name, f"{source.name}/{repository}@{digest}", reason)
        return reason

    async def _verify(self, policy: Policy, source: Source, repository: str,
                      digest: Digest) -> tuple[str | None, bool]:
        """(why `digest` is not allowed or None, whether that is worth remembering)."""
        manifests, failure = await self._signatures(source, repository, digest)
        if not manifests:
            return failure or "no cosign signature (no sha256-<hex>.sig tag nor signature " \
                              "referrer)", failure is None
        reasons: list[str] = []
        final = failure is None
        for data in manifests:
            if len(data) > MAX_SIGNATURE_MANIFEST:
                reasons.append(f"a signature manifest of {len(data)} bytes (at most "
                               f"{MAX_SIGNATURE_MANIFEST}, as registries take)")
                continue
            try:
                layers = signed_layers(data)
            except BadSignature as exc:
                reasons.append(str(exc))
                continue
            for layer in layers[:MAX_SIGNATURES]:
                reason, lasting = await self._check_layer(policy, source, repository, digest,
                                                          layer)
                if reason is None:
                    self._cover(policy, data)  # the signature itself, for clients checking it
                    return None, True
                reasons.append(reason)
                final = final and lasting
        return "; ".join(dict.fromkeys(reasons)), final

    async def _check_layer(self, policy: Policy, source: Source, repository: str,
                           digest: Digest, layer: SignedLayer) -> tuple[str | None, bool]:
        """(why this signed layer does not allow `digest` or None, whether that lasts: a
        payload that could not be read for another reason than absence is asked again)."""
        if layer.size > MAX_PAYLOAD:
            return f"a signed payload of {layer.size} bytes (at most {MAX_PAYLOAD})", True
        try:
            payload = await self._payload(source, repository, parse_digest(layer.payload))
        except _TooBig as exc:
            return f"a signed payload of {exc} bytes (at most {MAX_PAYLOAD})", True
        except RegistryError as exc:
            return (f"the signed payload {layer.payload} cannot be read: {exc.message}",
                    exc.code in ABSENT_BLOB)
        if not any(verifies(key, layer.signature, payload) for key in policy.keys):
            return "a signature no key of the policy verifies (made with another key, or " \
                   "altered)", True
        try:
            named = payload_digest(payload)
        except BadSignature as exc:
            return str(exc), True
        if named != str(digest):
            return f"a signed payload for another digest ({named})", True
        return None, True

    async def _signatures(self, source: Source, repository: str, digest: Digest
                          ) -> tuple[list[bytes], str | None]:
        """The signature manifests of `digest` (cosign's tag, then signature referrers), and
        why a lookup failed, if one did for another reason than absence."""
        found: list[bytes] = []
        failure = None
        references: list[Digest | str] = [fallback_tags(digest)[1]]  # sha256-<hex>.sig
        try:
            answer = await self.proxy.referrers(source, repository, digest, SIGNATURE_ARTIFACT)
            references += [parse_digest(str(c["digest"])) for c in
                           mt.child_manifests(answer.body)
                           if c.get("artifactType") == SIGNATURE_ARTIFACT]
        except RegistryError as exc:
            if exc.code not in ABSENT:
                failure = f"the signatures could not be looked up: {exc.message}"
        for reference in references[:MAX_SIGNATURES]:
            try:
                m = await self.proxy.manifest(source, repository, reference, SIGNATURE_ACCEPT,
                                              head=False)
            except RegistryError as exc:
                if exc.code not in ABSENT:
                    failure = f"the signatures could not be looked up: {exc.message}"
                continue
            if m.data is not None:
                found.append(m.data)
        return found, failure

    async def _payload(self, source: Source, repository: str, digest: Digest) -> bytes:
        """The payload's bytes, its size asked first: a manifest may declare a small size for
        a huge blob, which is never downloaded."""
        head, _ = await self.proxy.blob(source, repository, digest, head=True)
        head.close()
        if head.size is not None and head.size > MAX_PAYLOAD:
            raise _TooBig(head.size)
        body, _ = await self.proxy.blob(source, repository, digest, head=False)
        try:
            await body.stored()
        finally:
            body.close()
        data = self.proxy.store.read_bytes(digest)
        if data is None:
            raise RegistryError(ErrorCode.BLOB_UNKNOWN, "evicted as soon as stored")
        return data

    def _cover(self, policy: Policy, data: bytes) -> None:
        """What an allowed manifest references is allowed with it."""
        blobs, children = mt.referenced_blobs(data)
        for value in [*blobs, *children]:
            try:
                digest = parse_digest(value)
            except RegistryError:
                continue
            if not self._is_allowed(policy, digest):
                self._allow(policy, digest)

    def _refuse(self, policy: Policy, source: Source, repository: str, digest: Digest,
                reason: str) -> None:
        decision = "denied" if policy.enforce else "warned"
        self._counted(policy, decision).inc()
        log.warning("refused by signature policy" if policy.enforce
                    else "signature policy (warn): served anyway", extra={
                        "policy": policy.name, "upstream": source.name,
                        "repository": repository, "digest": str(digest), "reason": reason})
        if policy.enforce:
            raise RegistryError(ErrorCode.DENIED, f"denied by [[policy]] {policy.name!r}: "
                                f"{source.name}/{repository}@{digest}: {reason}")


def _is_attached_artifact(media_type: str, data: bytes) -> bool:
    """A signature, attestation or SBOM: an image manifest with no layer any container
    runtime would unpack as a filesystem (nothing it could run)."""
    if media_type in mt.INDEX_TYPES:
        return False
    return not any(_unpackable(t) for t in mt.layer_media_types(data))


def _unpackable(layer_type: str) -> bool:
    """Whether some runtime unpacks a layer of this media type: containerd's layer types,
    and moby's looser check (lowercased, any application/vnd.oci.image* or vnd.docker* type,
    octet-stream, json, text/html, or none at all)."""
    base = layer_type.split(";", 1)[0].strip().lower()
    return base in UNPACKED_TYPES or base.startswith(UNPACKED_PREFIXES)
