"""launch/hostfile.example is a hostfile DeepSpeed's launcher reads as documented: two nodes of 8 GPUs."""

from __future__ import annotations

from tests.conftest import REPO


def test_hostfile_example_is_two_nodes_of_eight_gpus_for_deepspeed():
    from deepspeed.launcher.runner import fetch_hostfile

    assert dict(fetch_hostfile(str(REPO / "launch" / "hostfile.example"))) == {"node1": 8, "node2": 8}
