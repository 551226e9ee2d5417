"""free_port: the port it picks stays free until a server binds it by number."""

import socket

import pytest

from actors import net


def test_free_port_is_bindable_and_outside_the_ephemeral_range():
    low, high = net.ephemeral_range()
    for _ in range(20):
        port = net.free_port("127.0.0.1")
        # an ephemeral port can be handed to any outgoing connection between the probe and the bind
        assert not low <= port <= high
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_free_port_skips_a_port_a_listener_holds(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        held.listen()
        # the only candidate below the "ephemeral range" is the held port, and nothing lies above it
        monkeypatch.setattr(net, "LOWEST", taken)
        monkeypatch.setattr(net, "ephemeral_range", lambda: (taken + 1, 65535))
        port = net.free_port("127.0.0.1", attempts=5)
        assert port != taken
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


@pytest.mark.parametrize("text", ["", "garbage", "1 2 3"])
def test_an_unreadable_range_falls_back_to_linux_default(monkeypatch, tmp_path, text):
    bad = tmp_path / "range"
    bad.write_text(text)
    monkeypatch.setattr(net, "EPHEMERAL_RANGE_FILE", bad)
    assert net.ephemeral_range() == (32768, 60999)


def test_the_learners_rendezvous_listens_on_its_address_only():
    """torch's TCPStore listens on every interface (::), unauthenticated, whatever MASTER_ADDR says: a learner
    rank's store must listen on the address it was given and nowhere else (and the group must still work)."""
    import subprocess
    import sys

    from tests.cli import ROOT

    probe = ("import psutil, torch, torch.distributed as dist; from learner.engine import init_distributed; "
             "init_distributed(0, 1, '127.0.0.1'); t = torch.ones(1); dist.all_reduce(t); "
             "print(sorted({c.laddr.ip for c in psutil.Process().net_connections('inet') if c.status == 'LISTEN'}), "
             "float(t))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "['127.0.0.1'] 1.0"


def test_free_port_never_picks_the_first_or_last_ephemeral_port(monkeypatch):
    """The ports just outside the range are the only candidates: a port on the range's edge is ephemeral too.
    Would catch the candidate ranges reaching one port into the ephemeral range."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        below = probe.getsockname()[1]
    monkeypatch.setattr(net, "LOWEST", below)
    monkeypatch.setattr(net, "ephemeral_range", lambda: (below + 1, 65534))
    assert {net.free_port("127.0.0.1") for _ in range(30)} <= {below, 65535}


def test_free_port_falls_back_to_the_kernel_when_nothing_lies_outside_the_range(monkeypatch):
    """Would catch the search run over no candidates (an IndexError on a machine whose ephemeral range is all)."""
    monkeypatch.setattr(net, "ephemeral_range", lambda: (1024, 65535))
    port = net.free_port("127.0.0.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_free_port_on_an_ipv6_address(ipv6_loopback):
    """Would catch an IPv6 host probed with an IPv4 socket (every bind fails: no port is ever found)."""
    port = net.free_port(ipv6_loopback)
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", port))


def test_the_rendezvous_task_loads_no_heavy_module_and_names_a_port_free_on_its_node():
    """Ray's worker for the learners' rendezvous task imports the function's module before running it, and the ranks
    wait for the task: beside the learner that import was DeepSpeed and the model, about 17 s of a GRPO run's start
    on 2 cores (benchmarks/startup.py). Would catch the function moved back into a module that loads torch, or an
    address on which the port cannot be bound."""
    from learner.grpo_learner import rendezvous_address
    from tests.cli import modules_loaded_by

    assert modules_loaded_by(rendezvous_address.__module__, ("torch", "deepspeed", "diffusers")) == []
    ip, port = rendezvous_address()
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
        s.bind((ip, port))
