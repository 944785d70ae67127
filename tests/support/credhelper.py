"""A fake `docker-credential-<name>` for tests: logs the server it is asked about and answers
fixed credentials, speaking the docker credential-helper protocol (`get`, server on stdin)."""

from __future__ import annotations

import stat
from pathlib import Path


def write_credential_helper(bindir: Path, name: str, username: str, secret: str,
                            log: Path) -> Path:
    bindir.mkdir(parents=True, exist_ok=True)
    script = bindir / f"docker-credential-{name}"
    script.write_text(f"""#!/bin/sh
[ "$1" = get ] || exit 1
read server
echo "$server" >> {log}
echo '{{"ServerURL": "'"$server"'", "Username": "{username}", "Secret": "{secret}"}}'
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script
