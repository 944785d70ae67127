"""Support code for the integration tests: real components on 127.0.0.1, no mocks.

- oci: build images offline (random incompressible layers, OCI and Docker schema 2
  manifests, OCI indexes and manifest lists) and write OCI image layouts.
- registry: Debian's docker-registry as an upstream (access-log request counting),
  ClosedPort, ThrottledProxy, htpasswd (Basic) auth, wait_until.
- tokenserver: a JWT token server for distribution's `auth: token`.
- clients: skopeo (registries.conf mirrors), containerd/ctr (hosts.toml), content
  verification, raw HTTP requests, pushing (skopeo from a layout, or the registry API).
- mirror: the mirror under test as a subprocess (config, start/kill -9/restart, its JSON
  request log, cache verification).
"""
