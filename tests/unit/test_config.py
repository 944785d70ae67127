import subprocess
import sys
from pathlib import Path

import pytest

from mirror.config import ConfigError, load_config, parse_config, parse_duration, parse_size

UP = {"upstream": [{"name": "docker.io", "url": "https://registry-1.docker.io"}]}


def test_sizes_and_durations() -> None:
    assert parse_size("20GiB") == 20 * 1024**3
    assert parse_size("1.5 MB") == 1_500_000
    assert parse_size(1024) == 1024
    assert parse_duration("60s") == 60 and parse_duration("5m") == 300
    assert parse_duration("500ms") == 0.5 and parse_duration(2) == 2.0
    for bad in ("20XB", "-1GiB", "", True):
        with pytest.raises(ValueError):
            parse_size(bad)
    for bad in ("60", "1w", "s"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_defaults_and_low_watermark() -> None:
    c = parse_config({"cache": {"max_size": "10GB"}, **UP})
    assert c.server.port == 5000 and c.cache.tag_ttl == 60.0
    assert c.cache.low_watermark == 9 * 10**9
    assert c.upstreams[0].name == "docker.io"


@pytest.mark.parametrize(("data", "key"), [
    ({"cache": {"max_size": "20XB"}, **UP}, "cache.max_size"),
    ({"cache": {"tag_ttl": "forever"}, **UP}, "cache.tag_ttl"),
    ({"cache": {"colour": "red"}, **UP}, "cache.colour"),
    ({"server": {"listen": "nope"}, **UP}, "server.listen"),
    ({"upstream": [{"name": "x", "url": "ftp://x"}]}, "upstream[0].url"),
    ({"upstream": [{"name": "x", "url": "https://x", "pasword": "typo"}]}, "upstream[0].pasword"),
    ({}, "upstream"),
    ({"extra": {}, **UP}, "extra"),
])
def test_errors_name_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, "my.toml")
    assert str(exc.value).startswith(f"my.toml: {key}: ")


def test_bad_config_exits_2_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text('[cache]\nmax_size = "lots"\n[[upstream]]\nname = "a"\nurl = "http://a"\n')
    proc = subprocess.run([sys.executable, "-m", "mirror", "serve", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "m.toml: cache.max_size: invalid size 'lots'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_shipped_config_loads() -> None:
    config = load_config(Path(__file__).parents[2] / "mirror.toml")
    assert config.upstreams[0].name == "docker.io"
    assert config.cache.max_size == 20 * 1024**3


def test_fallback_urls_are_urls_in_order_without_the_primary_or_repeats() -> None:
    c = parse_config({"upstream": [{
        "name": "docker.io", "url": "http://regional:5000",
        "fallback_urls": ["http://regional2:5000", "http://regional:5000",
                          "https://registry-1.docker.io", "http://regional2:5000"]}]})
    assert c.upstreams[0].fallback_urls == ("http://regional2:5000",
                                            "https://registry-1.docker.io")
    assert c.upstreams[0].connect_timeout == 3.0  # a cold miss fails in seconds
    for bad in ("https://r", ["ftp://r"], ["https://u:p@r"]):
        with pytest.raises(ConfigError, match=r"upstream\[0\]\.fallback_urls"):
            parse_config({"upstream": [{"name": "d", "url": "https://d", "fallback_urls": bad}]})


def test_s3_reads_keys_from_files_and_refuses_what_it_cannot_use(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("AKID\n")
    (tmp_path / "s").write_text("sekrit\n")
    s3 = {"endpoint": "http://127.0.0.1:8333", "bucket": "mirror", "prefix": "cache/",
          "access_key_file": str(tmp_path / "k"), "secret_key_file": str(tmp_path / "s")}
    c = parse_config({"s3": s3, **UP}).s3
    assert c is not None and (c.access_key, c.secret_key) == ("AKID", "sekrit")
    assert c.path_style and c.timeout == 30.0 and "sekrit" not in repr(c)
    assert parse_config(UP).s3 is None
    for change, key in [({"endpoint": "s3.example"}, "s3.endpoint"),
                        ({"bucket": ""}, "s3.bucket"),
                        ({"prefix": "../x/"}, "s3.prefix"),
                        ({"secret_key_file": str(tmp_path / "none")}, "s3.secret_key_file"),
                        ({"part_size": "1MiB"}, "s3.part_size"),
                        ({"ca_file": str(tmp_path / "none.pem")}, "s3.ca_file"),
                        ({"redirect": "yes"}, "s3.redirect"),
                        ({"colour": "red"}, "s3.colour")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_config({"s3": {**s3, **change}, **UP})
    only_access = {"endpoint": "http://e", "bucket": "b", "access_key": "a"}
    with pytest.raises(ConfigError, match=r"s3\.secret_key"):
        parse_config({"s3": only_access, **UP})
