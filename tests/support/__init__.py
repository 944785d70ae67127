"""Support code for the tests: real components on 127.0.0.1, no mocks.

- oci: build images offline (random incompressible layers, OCI and Docker schema 2
  manifests, OCI indexes and manifest lists) and write OCI image layouts.
- registry: Debian's docker-registry as an upstream (access-log request counting),
  ClosedPort, ThrottledProxy, htpasswd (Basic) auth, wait_until.
- tokenserver: a JWT token server for distribution's `auth: token`.
- clients: skopeo (registries.conf mirrors), containerd/ctr (hosts.toml), content
  verification, raw HTTP requests, pushing (skopeo from a layout, or the registry API).
- mirror: the mirror under test as a subprocess (config, start/kill -9/restart, its JSON
  request log, cache verification).
- mirrorfixtures: blackhole and mirror_factory, the fixtures tests/integration and
  tests/faults share (imported into their conftest.py).
- faultupstream: a fault-injecting upstream (reset, stall, corrupt, ignore Range, 429,
  redirect, Bearer/Basic challenges) for tests/inprocess and tests/faults.
- faultmatrix: tests/faults' MatrixUpstream (per-request actions, gates), its loop thread,
  a raw-socket client and the checks every row makes.
- appmirror: the mirror's aiohttp app in the test's own loop (tests/inprocess).
- store: checks on a cache dir from the outside (every stored blob hashes to its name).
- credhelper: a docker-credential-* helper script.
"""
