"""The `mirror` command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mirror import __version__
from mirror.config import Config, ConfigError, load_config
from mirror.oci.errors import RegistryError

if TYPE_CHECKING:
    from mirror.cache.index import Index
    from mirror.cache.store import BlobStore

Command = Callable[[Config, argparse.Namespace], int]


def _config_path(value: str | None) -> str:
    return value or os.environ.get("MIRROR_CONFIG") or "./mirror.toml"


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    from mirror.process.serve import serve

    return serve(config)


def cmd_verify(config: Config, args: argparse.Namespace) -> int:
    from mirror.commands.verify import verify
    from mirror.runtime import open_cache

    if args.tier == "s3":
        return _verify_bucket(config)
    with open_cache(config) as (store, index):
        report = verify(store, index)
    for digest in report.bad:
        print(f"removed {digest}: content does not match its digest")
    print(f"verified {report.checked} files ({report.bytes} bytes): {len(report.bad)} bad")
    return 1 if report.bad else 0


def _verify_bucket(config: Config) -> int:
    from mirror.runtime import open_bucket_tier, open_cache
    from mirror.tiers.bounds import verify_bucket

    if config.s3 is None:
        print("mirror: verify: --tier s3 needs an [s3] section", file=sys.stderr)
        return 2

    async def run() -> int:
        with open_cache(config) as (store, index):
            async with open_bucket_tier(config, store, index) as keeper:
                report = await verify_bucket(keeper.bucket)
        for digest in report.bad:
            print(f"removed {digest} from the bucket: content does not match its digest")
        print(f"verified {report.checked} bucket objects ({report.bytes} bytes): "
              f"{len(report.bad)} bad" + (f", {report.unreadable} unreadable"
                                          if report.unreadable else ""))
        return 1 if report.bad or report.unreadable else 0
    return asyncio.run(run())


def _gc_bucket(config: Config) -> int:
    from mirror.commands.status import human
    from mirror.runtime import open_bucket_tier, open_cache

    async def run() -> int:
        with open_cache(config) as (store, index):
            async with open_bucket_tier(config, store, index) as keeper:
                result = await keeper.trim()
                error = keeper.bucket.last_error
        if result is None:
            print("mirror: gc: the bucket is being trimmed by another process or could not be "
                  f"listed{f' ({error})' if error else ''}", file=sys.stderr)
            return 1
        print(f"bucket: deleted {len(result.deleted)} objects ({human(result.freed)}); "
              f"bucket now {human(result.total_after)}"
              + (f"; {result.failed} deletes failed ({error})" if result.failed else ""))
        return 1 if result.failed else 0
    return asyncio.run(run())


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    from mirror.commands.status import status_lines
    from mirror.runtime import open_cache

    with open_cache(config) as (store, index):
        print("\n".join(status_lines(config, store, index)))
    return 0


def cmd_gc(config: Config, args: argparse.Namespace) -> int:
    from mirror.cache.eviction import evict_to_watermark
    from mirror.commands.status import human
    from mirror.runtime import open_cache

    with open_cache(config) as (store, index):
        result = evict_to_watermark(config, store, index)
    if result is None:
        print("mirror: gc: another process is evicting right now; try again shortly",
              file=sys.stderr)
        return 1
    print(f"evicted {result.evicted} entries ({human(result.freed)}); "
          f"cache now {human(result.total_after)}")
    return _gc_bucket(config) if config.s3 is not None else 0


def cmd_warm(config: Config, args: argparse.Namespace) -> int:
    from mirror.commands.warm import warm
    from mirror.pull.images import default_platform

    platforms = None if args.all_platforms else (args.platform or [default_platform()])
    return 1 if asyncio.run(warm(config, args.images, platforms, not args.no_referrers)) else 0


def cmd_token(config: Config, args: argparse.Namespace) -> int:
    from mirror.commands import token

    if args.action == "create":
        if not args.name:
            print("mirror: token create: --name is required", file=sys.stderr)
            return 2
        return token.create(config, args.name, args.allow or [], args.expires)
    if args.action == "revoke":
        if not args.name:
            print("mirror: token revoke: --name is required", file=sys.stderr)
            return 2
        return token.revoke(config, args.name)
    return token.listing(config)


def cmd_sync(config: Config, args: argparse.Namespace) -> int:
    from mirror.commands.sync import sync

    return asyncio.run(sync(config, args.rule or [], args.dry_run))


def cmd_purge(config: Config, args: argparse.Namespace) -> int:
    from mirror.commands.purge import purge

    return 1 if asyncio.run(purge(config, args.targets, args.dry_run)) else 0


def cmd_policy(config: Config, args: argparse.Namespace) -> int:
    from mirror.commands.policy import check

    return 1 if asyncio.run(check(config, args.images)) else 0


def cmd_export(config: Config, args: argparse.Namespace) -> int:
    from mirror.commands.archive import export
    from mirror.runtime import open_cache

    with open_cache(config) as (store, index):
        names = [u.name for u in config.upstreams]
        if config.s3 is not None:
            fetched = asyncio.run(_from_bucket(config, store, index, names, args.images,
                                               not args.no_referrers))
            if fetched:
                print(f"fetched {fetched} blobs from the bucket (verified)")
        n = export(store, index, names, args.images, Path(args.output),
                   not args.no_referrers)
    print(f"exported {len(args.images)} images ({n} files) to {args.output}")
    return 0


async def _from_bucket(config: Config, store: BlobStore, index: Index, names: list[str],
                       images: list[str], referrers: bool) -> int:
    """Blobs of the images only the bucket holds, copied to the local dir for `export`."""
    from mirror.commands.archive import missing_blobs
    from mirror.runtime import open_bucket_tier

    missing = missing_blobs(store, index, names, images, referrers)
    if not missing:
        return 0
    async with open_bucket_tier(config, store, index) as keeper:
        return sum([await keeper.bucket.copy_to(store, d) for d in sorted(missing, key=str)])


def cmd_import(config: Config, args: argparse.Namespace) -> int:
    from mirror.commands.archive import import_archive
    from mirror.runtime import open_cache

    with open_cache(config) as (store, index):
        n, refs = import_archive(store, index, [u.name for u in config.upstreams],
                                 Path(args.archive), not args.no_referrers)
    for ref in refs:
        print(f"imported {ref}")
    print(f"imported {n} verified files from {args.archive}")
    return 0


NO_REFERRERS = ("leave out the signatures, attestations and SBOMs attached to the images "
                "(the referrers API and cosign's sha256-<hex>.sig/.att/.sbom tags)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirror",
        description="A pull-through caching mirror for container registries (OCI distribution "
                    "API). Clients pull from it; it serves from its disk cache and fetches "
                    "misses from the configured upstream registries.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Command, help: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=description)
        p.add_argument("--config", metavar="PATH",
                       help="configuration file (default: $MIRROR_CONFIG, else ./mirror.toml)")
        p.set_defaults(func=func)
        return p

    add("serve", cmd_serve, "run the mirror",
        "Serve the registry pull API on [server] listen, caching into [cache] dir. Starts "
        "whether or not the upstreams are reachable.")
    verify = add("verify", cmd_verify, "rehash the cache; remove what does not match",
                 "Rehash every stored blob and manifest, remove anything that does not match "
                 "its digest, and exit 1 if any was found. --tier s3: the same for the "
                 "bucket's objects (streamed).")
    verify.add_argument("--tier", choices=["local", "s3"], default="local",
                        help="what to verify: the local dir (default) or the [s3] bucket")
    add("status", cmd_status, "show cache size, entries, hit ratio, pins, rate limits",
        "Print the cache's size against max_size, entry count, hit ratio, oldest entry, pinned "
        "images and the upstreams' last seen rate limits.")
    add("gc", cmd_gc, "evict down to the low watermark now",
        "Evict least-recently-used content (never pinned images) until the cache is at "
        "[cache] low_watermark; with [s3], trim the bucket to its max_size and max_unused.")
    warm = add("warm", cmd_warm, "fill the cache with images",
               "Resolve each image reference (e.g. docker.io/library/nginx:1.27, "
               "ghcr.io/o/r@sha256:...) and cache its manifests and blobs, through the same "
               "single-flight path as a client pull.")
    warm.add_argument("images", nargs="+", metavar="IMAGE")
    group = warm.add_mutually_exclusive_group()
    group.add_argument("--platform", action="append", metavar="OS/ARCH[/VARIANT]",
                       help="platform to cache from a multi-platform image (repeatable; "
                            "default: this machine's, e.g. linux/amd64)")
    group.add_argument("--all-platforms", action="store_true",
                       help="cache every platform of multi-platform images")
    warm.add_argument("--no-referrers", action="store_true", help=NO_REFERRERS)
    sync = add("sync", cmd_sync, "run the [[sync]] rules once, now",
               "List each rule's repositories' tags, HEAD every tag it selects and cache the "
               "images it does not hold whole yet (as the server does every interval), with a "
               "progress bar; a rule the server is running right now is skipped. Exit 1 if "
               "something failed, 2 for a rule not configured.")
    sync.add_argument("--rule", action="append", metavar="NAME",
                      help="run only this rule (repeatable; default: every rule)")
    sync.add_argument("--dry-run", action="store_true",
                      help="list what would be cached and unpinned; fetch only tags lists "
                           "and HEADs, change nothing")
    tok = add("token", cmd_token, "create, list or revoke robot tokens for CI",
              "token create --name NAME --allow 'docker.io/**' [--expires 90d]: a robot "
              "account that may pull what its patterns allow; the token is printed once (use "
              "it as the password with the robot's name as the user). token list; token "
              "revoke --name NAME (takes effect within a second, no restart).")
    tok.add_argument("action", choices=["create", "list", "revoke"])
    tok.add_argument("--name", metavar="NAME", help="the robot's name (its user name)")
    tok.add_argument("--allow", action="append", metavar="UPSTREAM/PATTERN",
                     help="what it may pull, as [[auth.rule]] allow (repeatable)")
    tok.add_argument("--expires", default="90d", metavar="DURATION",
                     help="lifetime (e.g. 90d, 12h) or 'never' (default 90d)")
    purge = add("purge", cmd_purge, "remove images or repositories from the cache",
                "Remove each named image (docker.io/library/nginx:1.27, …@sha256:…) or, named "
                "without a tag or digest, the whole repository (docker.io/library/nginx): its "
                "manifests (an index's platform manifests too), tags, signatures, attestations "
                "and SBOMs, and every blob no other cached image uses. Never a pinned image "
                "(refused when named; kept in a repository), nor a blob being downloaded. "
                "With [s3], the purged blobs' bucket objects are deleted too. Exit 1 if a "
                "target is not cached or is pinned.")
    purge.add_argument("targets", nargs="+", metavar="IMAGE|REPOSITORY")
    purge.add_argument("--dry-run", action="store_true",
                       help="print what would be removed and kept; change nothing")
    policy = add("policy", cmd_policy, "show what the signature policies decide for images",
                 "policy check IMAGE…: resolve each image, look up its cosign signatures and "
                 "print what [[policy]] decides and why (no layers are pulled); exit 1 if an "
                 "enforced policy refuses one.")
    policy.add_argument("action", choices=["check"])
    policy.add_argument("images", nargs="+", metavar="IMAGE")
    export = add("export", cmd_export, "write cached images to an OCI layout tar",
                 "Write the named cached images (all their cached platforms) to an OCI image "
                 "layout archive, for `mirror import` on a mirror with no network.")
    export.add_argument("images", nargs="+", metavar="IMAGE")
    export.add_argument("--output", "-o", required=True, metavar="FILE.tar")
    export.add_argument("--no-referrers", action="store_true", help=NO_REFERRERS)
    imp = add("import", cmd_import, "load an archive written by `mirror export`",
              "Verify every file of an OCI layout archive against its digest, store it, and "
              "restore the images' tags, so pulls work with no upstream.")
    imp.add_argument("archive", metavar="FILE.tar")
    imp.add_argument("--no-referrers", action="store_true", help=NO_REFERRERS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        from mirror.logs import setup_logging

        setup_logging("warning")
    try:
        config = load_config(_config_path(args.config))
        result: int = args.func(config, args)
        return result
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    except (RegistryError, OSError, ValueError, tarfile.TarError) as exc:
        message = exc.message if isinstance(exc, RegistryError) else str(exc)
        print(f"mirror: {args.command}: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
