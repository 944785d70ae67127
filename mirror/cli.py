"""The `mirror` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from mirror import __version__
from mirror.config import Config, ConfigError, load_config


def _config_path(value: str | None) -> str:
    return value or os.environ.get("MIRROR_CONFIG") or "./mirror.toml"


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH",
                   help="configuration file (default: $MIRROR_CONFIG, else ./mirror.toml)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirror",
        description="A pull-through caching mirror for container registries (OCI distribution "
                    "API). Clients pull from it; it serves from its disk cache and fetches "
                    "misses from the configured upstream registries.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", help="run the mirror",
                           description="Serve the registry pull API on [server] listen, caching "
                                       "into [cache] dir. Starts whether or not the upstreams "
                                       "are reachable.")
    _add_config(serve)
    return parser


def load(path: str | None) -> Config:
    return load_config(_config_path(path))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load(args.config)
        if args.command == "serve":
            from mirror.serve import serve

            return serve(config)
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
