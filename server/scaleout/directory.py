"""Where each replica's ``/metrics`` is, for Prometheus.

Every replica keeps its own ``hedgerow_*`` metrics (a ``Metrics`` registry, as the single process
does) and serves them over HTTP on a free port of its node. A small Ray actor, the directory, holds
the list: a replica adds itself when it starts and removes itself when Serve stops it; one that died
without saying so is dropped when its port stops answering. ``hedgerow serve --ray
--metrics-targets FILE`` writes the list as a Prometheus file-based service discovery file every few
seconds (``write_targets``), each target labelled with its replica, which
``monitoring/prometheus-scaleout.yml`` reads. Nothing here goes through Ray's own metrics export: the
metrics stay exactly the single process's, histograms included.

The directory is one detached actor per Ray namespace of the application (``DIRECTORY_NAME`` in
``NAMESPACE``), created by whichever replica comes first.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile

log = logging.getLogger("hedgerow.scaleout")

DIRECTORY_NAME = "hedgerow-replica-directory"
NAMESPACE = "hedgerow"
PROBE_SECONDS = 0.5


def _probe(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=PROBE_SECONDS):
            return True
    except OSError:
        return False


class ReplicaDirectory:
    """replica id -> host:port of its /metrics (a Ray actor: ``_actor()``)."""

    def __init__(self):
        self.replicas: dict[str, str] = {}

    def register(self, replica_id: str, address: str) -> None:
        self.replicas[replica_id] = address

    def unregister(self, replica_id: str) -> None:
        self.replicas.pop(replica_id, None)

    def targets(self) -> dict[str, str]:
        """The replicas whose metrics port answers (the others are forgotten)."""
        for replica_id, address in list(self.replicas.items()):
            if not _probe(address):
                del self.replicas[replica_id]
        return dict(self.replicas)


def _actor():
    import ray

    actor = ray.remote(num_cpus=0)(ReplicaDirectory)
    return actor.options(name=DIRECTORY_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote()


def register_replica(replica_id: str, address: str) -> None:
    _actor().register.remote(replica_id, address)


def unregister_replica(replica_id: str) -> None:
    try:
        _actor().unregister.remote(replica_id)
    except Exception as exc:  # the cluster is going away with the replica: nothing left to tell
        log.debug("could not unregister replica %s: %s", replica_id, exc)


def replica_targets() -> dict[str, str]:
    """replica id -> host:port of every live replica's /metrics (from a Ray driver or a replica)."""
    import ray

    return ray.get(_actor().targets.remote())


def remove_directory() -> None:
    """Kill the directory actor (it is detached: it would outlive the application)."""
    import ray

    try:
        ray.kill(ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE))
    except ValueError:  # none
        pass


def scrape_config(targets: dict[str, str], app: str) -> list[dict]:
    """Prometheus file-based service discovery: one group per replica, labelled with it."""
    return [{"targets": [address], "labels": {"replica": replica_id, "hedgerow_app": app}}
            for replica_id, address in sorted(targets.items())]


def write_targets(path: str, targets: dict[str, str], app: str) -> None:
    """Write the file atomically (Prometheus may read it at any moment)."""
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
        json.dump(scrape_config(targets, app), f, indent=2)
    os.replace(f.name, path)
