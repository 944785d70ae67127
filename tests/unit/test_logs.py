import asyncio
import json

import pytest

from mirror.logs import AccessLog, timestamp


def test_timestamp() -> None:
    assert timestamp(0.25) == "1970-01-01T00:00:00.250Z"


async def test_access_lines_are_batched_then_written_as_json(
        capsys: pytest.CaptureFixture[str]) -> None:
    log = AccessLog()
    for i in range(3):
        log.emit({"method": "GET", "path": f"/v2/{i}", "status": 200})
    assert capsys.readouterr().err == ""  # not yet: one write per batch
    timer = log._timer
    assert timer is not None and timer.when() - asyncio.get_running_loop().time() <= 0.05
    timer._run()  # what the loop does when the timer is due
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert [x["path"] for x in lines] == ["/v2/0", "/v2/1", "/v2/2"]
    assert lines[0]["logger"] == "mirror.access" and lines[0]["status"] == 200


def test_without_a_loop_lines_go_out_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    log = AccessLog()
    log.emit({"path": "/x"})
    assert json.loads(capsys.readouterr().err)["path"] == "/x"
    log.enabled = False
    log.emit({"path": "/y"})
    assert capsys.readouterr().err == ""


def test_access_line_is_the_json_of_its_fields() -> None:
    from mirror.logs import access_line

    fields: dict[str, object] = {
        "method": "GET", "path": '/v2/a"b\\c/\u00e9\n', "status": 200, "bytes": 10,
        "duration_ms": 0.25, "flag": True, "extra": ["x", 1], "none": None}
    assert json.loads(access_line("T", fields)) == {
        "time": "T", "level": "info", "logger": "mirror.access", "msg": "request", **fields}
