"""A real SLURM (two nodes on this host) for the tests in this folder, started once per session (cluster.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.slurm.cluster import ClusterUnavailable, SlurmCluster, install_slurm

_unavailable: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:
    """A skip is easy to miss among dots: say it in a banner at the end of the run."""
    if _unavailable:
        terminalreporter.section("SLURM TESTS NOT RUN", sep="!", red=True, bold=True)
        terminalreporter.write_line(_unavailable[0], red=True, bold=True)


@pytest.fixture(scope="session")
def slurm_cluster(request: pytest.FixtureRequest) -> Iterator[SlurmCluster]:
    """munged, slurmctld and two slurmd of our own; stopped, exactly those, at the end of the session."""
    cluster = SlurmCluster()
    try:
        install_slurm()
        cluster.start()
    except ClusterUnavailable as exc:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
        reason = f"SLURM TESTS NOT RUN: no test cluster could be started: {exc}"
        _unavailable.append(reason)
        pytest.skip(reason)
    except BaseException:
        cluster.stop()
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
        if not request.session.testsfailed:  # else its logs stay, for the post-mortem
            shutil.rmtree(cluster.root, ignore_errors=True)
