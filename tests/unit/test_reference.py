import pytest

from mirror.oci.errors import RegistryError
from mirror.oci.reference import Digest, digest_of, parse_digest, parse_reference, validate_name

HEX = "a" * 64


@pytest.mark.parametrize("name", ["nginx", "library/nginx", "a/b/c", "my-app", "a__b", "a.b_c",
                                  "x" * 255])
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "..", "../etc", "/abs", "a//b", "A", "a/", "a..b",
                                  "a/../b", "-a", "a_", "a___b", "x" * 256, "a b", "a%2fb"])
def test_invalid_names(name: str) -> None:
    with pytest.raises(RegistryError) as exc:
        validate_name(name)
    assert exc.value.code == "NAME_INVALID" and exc.value.status == 400


def test_digest_roundtrip() -> None:
    d = parse_digest(f"sha256:{HEX}")
    assert d == Digest("sha256", HEX) and str(d) == f"sha256:{HEX}"
    assert parse_digest("sha512:" + "b" * 128).algorithm == "sha512"
    assert digest_of(b"abc").matches(b"abc") and not digest_of(b"abc").matches(b"abd")


@pytest.mark.parametrize("value", ["sha256:" + "A" * 64, "sha256:" + "a" * 63, "sha256:",
                                   "md5:" + "a" * 32, "sha256:../../etc/passwd", HEX,
                                   "sha256:" + "g" * 64, "sha512:" + "a" * 64, ":" + HEX])
def test_invalid_digests(value: str) -> None:
    with pytest.raises(RegistryError) as exc:
        parse_digest(value)
    assert exc.value.code == "DIGEST_INVALID" and exc.value.status == 400


def test_reference_is_tag_or_digest() -> None:
    assert parse_reference("latest") == "latest"
    assert parse_reference(f"sha256:{HEX}") == Digest("sha256", HEX)
    for bad in ("", ".hidden", "-x", "a" * 129, "a/b"):
        with pytest.raises(RegistryError):
            parse_reference(bad)
