"""Where an image's signatures, attestations and SBOMs are found (pure): the referrers API
(an image index of the manifests whose `subject` is the image) and the tag schema of
registries without it: OCI 1.1's `sha256-<hex>` index tag, and cosign's `sha256-<hex>.sig`,
`.att` and `.sbom` tags."""

from __future__ import annotations

from mirror.oci.reference import Digest

COSIGN_SUFFIXES = (".sig", ".att", ".sbom")


def fallback_tags(subject: Digest) -> list[str]:
    """The tags that may hold what refers to `subject`, when the referrers API is absent."""
    base = f"{subject.algorithm}-{subject.hex}"
    return [base, *(base + suffix for suffix in COSIGN_SUFFIXES)]
