"""A `phasesplit` child dies with the process that started it, however that one exits, and passes the tie
on to nothing it starts itself."""

import os
import subprocess
import signal
import sys
import textwrap

from support.polling import poll

from phasesplit import parent_death

CHILD = textwrap.dedent("""
    import os, sys, time
    from phasesplit import parent_death
    parent_death.arm_from_env()
    print(os.getpid(), parent_death.PARENT_PID_ENV in os.environ, flush=True)
    time.sleep(60)
""")

# The parent starts the child with child_env, reports the child's line, then is killed.
PARENT = textwrap.dedent(f"""
    import subprocess, sys
    from phasesplit import parent_death
    child = subprocess.Popen([sys.executable, "-c", {CHILD!r}], stdout=subprocess.PIPE, text=True,
                             env=parent_death.child_env())
    print(child.stdout.readline(), end="", flush=True)
    sys.stdin.read()
""")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_child_dies_when_its_parent_is_killed_and_does_not_pass_the_tie_on():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        pid, passed_on = parent.stdout.readline().split()
        pid = int(pid)
        assert passed_on == "False", "the child's own children must not inherit the tie to its parent"
        assert alive(pid)
        parent.kill()
        parent.wait()
        assert poll(lambda: alive(pid), lambda up: not up, 10, interval=0.1) is False
    finally:
        if parent.poll() is None:
            parent.kill()


def test_a_child_whose_parent_is_already_gone_stops_at_once():
    env = {**os.environ, parent_death.PARENT_PID_ENV: "1"}  # not this child's parent: it already died
    child = subprocess.Popen([sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE)
    assert child.wait(30) == -signal.SIGTERM
