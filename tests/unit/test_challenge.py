from mirror.oci.challenge import Challenge, parse_all, parse_www_authenticate


def test_docker_hub_bearer() -> None:
    h = ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
         'scope="repository:library/nginx:pull"')
    assert parse_www_authenticate(h) == [Challenge("bearer", {
        "realm": "https://auth.docker.io/token", "service": "registry.docker.io",
        "scope": "repository:library/nginx:pull"})]


def test_commas_and_escapes_inside_quotes() -> None:
    h = r'Bearer realm="https://a/t",scope="repository:a:pull,push repository:b:pull",x="q\"uo"'
    [c] = parse_www_authenticate(h)
    assert c.params["scope"] == "repository:a:pull,push repository:b:pull"
    assert c.params["x"] == 'q"uo'


def test_several_challenges_in_one_header_and_across_headers() -> None:
    h = 'Basic realm="reg", Bearer realm="https://t", service=svc'
    assert [c.scheme for c in parse_www_authenticate(h)] == ["basic", "bearer"]
    assert parse_www_authenticate(h)[1].params == {"realm": "https://t", "service": "svc"}
    both = parse_all(['Basic realm="a"', 'Bearer realm="b"'])
    assert [(c.scheme, c.realm) for c in both] == [("basic", "a"), ("bearer", "b")]


def test_whitespace_case_and_garbage() -> None:
    [c] = parse_www_authenticate('  BEARER   Realm = "x" ,  Service=y  ')
    assert c == Challenge("bearer", {"realm": "x", "service": "y"})
    assert parse_www_authenticate("") == []
    assert parse_www_authenticate('Bearer realm="unterminated')[0].realm == "unterminated"
    assert [c.scheme for c in parse_www_authenticate("@@@ Basic")] == ["basic"]


def test_retry_after() -> None:
    from mirror.upstream.client import retry_after_seconds

    assert retry_after_seconds("120") == 120
    assert retry_after_seconds(None) == 30
    assert retry_after_seconds("garbage", default=5) == 5
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470) == 10
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490) == 0
