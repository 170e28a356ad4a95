"""Integration tier: tests against the real local control plane.

Boundary: real etcd, kube-apiserver (RBAC on), kube-controller-manager (Job controller, garbage
collector, TTL controller), kube-scheduler, the process node running pods as local processes,
and the versitygw S3 server — all started once per session by the ``cluster`` fixture in
tests/conftest.py. Nothing here is mocked. Every test works in its own namespace.
"""
