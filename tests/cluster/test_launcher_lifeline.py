"""die_with_parent, the child's half of "a cluster's processes end with their launcher" (the SIGKILLed launcher
itself: test_cluster_mixed.py::test_children_die_with_a_killed_launcher)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from services.cluster.launcher import PARENT_ENV

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")

CHILD = ("import os, sys, time; from services.cluster.launcher import die_with_parent, PARENT_ENV; "
         "die_with_parent(); print(os.environ.get(PARENT_ENV), flush=True); time.sleep(float(sys.argv[1]))")


def child(parent: str, sleep_s: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(sleep_s)], env={**os.environ, PARENT_ENV: parent},
                            stdout=subprocess.PIPE, text=True)


def test_a_child_whose_launcher_is_already_gone_ends_itself() -> None:
    """The launcher died between the child's fork and its die_with_parent: the child's parent is not the pid it
    was given, so it sends itself SIGTERM instead of serving as an orphan."""
    p = child("1", 60)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == -signal.SIGTERM and out == ""


def test_a_child_of_a_live_launcher_serves_and_passes_nothing_on() -> None:
    p = child(str(os.getpid()), 0)
    out, _ = p.communicate(timeout=30)
    assert p.returncode == 0
    assert out.strip() == "None"  # popped: a grandchild does not check against our pid
