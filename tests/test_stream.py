"""The experience stream on a real (embedded) redis-server: auth, safetensors payloads, ack semantics."""

import json
import os
import signal
import socket
import time
from dataclasses import replace

import psutil
import pytest
import redis
import safetensors.torch
import torch

from actors.experience import Group, SamplerSpec
from actors.stream import BLOCK_S, EmbeddedRedis, ExperienceStream, RedisAddress, learner_group


def make_group(prompt: str, version: int = 0, g: int = 2, steps: int = 3, index: int = 0) -> Group:
    """A group for prompt `index` of iteration 0: (iteration, index) is its idempotency key, one group per key."""
    return Group(prompt, index, 0, version, SamplerSpec("prox", steps, 1.0, 2.0),
                 scores={"a": torch.rand(g), "b": torch.rand(g)}, weights={"a": 0.7, "b": 0.3},
                 samples=torch.randn(g, 3, 4, 4), states=torch.randn(g, steps, 3, 4, 4),
                 log_probs=torch.randn(g, steps - 1))


def assert_same(a: Group, b: Group) -> None:
    assert (a.prompt, a.prompt_index, a.iteration, a.policy_version, a.sampler, a.weights) == (
        b.prompt, b.prompt_index, b.iteration, b.policy_version, b.sampler, b.weights)
    assert torch.equal(a.samples, b.samples)
    assert a.has_trajectory == b.has_trajectory
    if a.has_trajectory:
        assert torch.equal(a.states, b.states) and torch.equal(a.log_probs, b.log_probs)
    assert a.scores.keys() == b.scores.keys() and all(torch.equal(a.scores[k], b.scores[k]) for k in a.scores)


def listening(server: EmbeddedRedis) -> list[tuple[str, int]]:
    """The TCP addresses the server process listens on."""
    return [tuple(c.laddr) for c in psutil.Process(server.proc.pid).net_connections("inet") if c.status == "LISTEN"]


def test_server_requires_the_password_and_opens_no_tcp_port(server):
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(unix_socket_path=server.socket).ping()
    with pytest.raises(ConnectionError, match="cannot reach Redis"):
        RedisAddress(unix_socket=server.socket, password="wrong").connect()
    assert listening(server) == []  # (CONFIG is disabled on the server: asked of the OS instead)


def test_groups_round_trip_and_are_pending_until_acked(server):
    stream = ExperienceStream(server.address, "t")
    stream.create()
    stream.create()  # idempotent
    sent = [make_group(f"p{i}", version=i, index=i) for i in range(3)]
    ids = [stream.add(group) for group in sent]
    got = stream.read("rank0", count=3, timeout_s=5)
    assert [entry_id for entry_id, _ in got] == ids
    for group, (_, received) in zip(sent, got):
        assert_same(group, received)
        assert torch.equal(received.reward, 0.7 * group.scores["a"] + 0.3 * group.scores["b"])
    assert stream.pending() == 3
    assert stream.ack(ids[:2]) == 2 and stream.pending() == 1
    assert stream.ack(ids) == 1 and stream.pending() == 0
    with pytest.raises(TimeoutError):
        stream.read("rank0", count=1, timeout_s=0.2)  # nothing new: no entry is delivered twice


def test_payloads_are_not_pickles(server):
    stream = ExperienceStream(server.address, "t")
    stream.create()
    entry = stream.add(make_group("x"))
    raw = stream.client.xrange(stream.key, entry, entry)[0][1]
    assert set(raw) == {b"meta", b"tensors"}
    assert not raw[b"tensors"].startswith(b"\x80")  # pickle protocol marker
    assert json.loads(raw[b"meta"])["prompt"] == "x"  # JSON
    assert set(safetensors.torch.load(raw[b"tensors"])) == {"samples", "states", "log_probs", "score/a", "score/b"}


def test_unreachable_redis_gives_advice():
    with pytest.raises(ConnectionError, match="redis.url"):
        RedisAddress(url="redis://127.0.0.1:1/0").connect()


def test_a_redis_that_never_answers_gives_advice_not_a_lost_stream(monkeypatch):
    """A host behind a firewall that drops packets: the connect times out (redis.TimeoutError, not a
    ConnectionError), which reached the driver as "Redis stopped answering ... the stream in it is lost"."""
    monkeypatch.setattr("actors.stream.SOCKET_TIMEOUT_S", 1.0)  # not the 30 s a real read may block
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts, never replies
    try:
        with pytest.raises(ConnectionError, match="cannot reach Redis .*TimeoutError.*redis.url"):
            RedisAddress(url=f"redis://127.0.0.1:{listener.getsockname()[1]}/0").connect()
    finally:
        listener.close()


@pytest.mark.parametrize("password", ['my secret"pw', "back\\slash 'and' quotes\"", "trailing\\", "two\nlines\r"])
def test_any_password_starts_the_embedded_server_and_is_the_one_it_requires(password):
    """The password went into redis.conf unquoted: a space or quote broke the file (and redis-server echoed the
    line, password included, into the error), a pair of quotes was silently dropped from it."""
    with EmbeddedRedis(host="127.0.0.1", password=password) as s:
        assert redis.Redis.from_url(s.address.url, password=password).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(s.address.url, password=password[:-1]).ping()


def test_the_password_is_in_no_file_while_the_server_runs():
    """A driver killed before close() leaves the server's folder behind: nothing in it may hold the password (it
    was in redis.conf until the config went in on stdin)."""
    password = "never-on-disk-7c1e"
    with EmbeddedRedis(password=password) as s:
        assert redis.Redis(unix_socket_path=s.socket, password=password).ping()
        files = [p for p in s.dir.rglob("*") if p.is_file()]
        assert not [p for p in files if password.encode() in p.read_bytes()], files
        assert password not in " ".join(psutil.Process(s.proc.pid).cmdline())


def test_cluster_mode_listens_on_the_given_address_only_with_the_given_password():
    with EmbeddedRedis(host="127.0.0.1", password="from-the-environment") as s:
        assert s.socket is None and s.address.url.startswith("redis://127.0.0.1:")
        assert listening(s) == [("127.0.0.1", int(s.address.url.rsplit(":", 1)[1].split("/")[0]))]
        assert not any(c.family == socket.AF_UNIX for c in psutil.Process(s.proc.pid).net_connections("unix"))
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(s.address.url).ping()
        stream = ExperienceStream(s.address, "t")
        stream.create()
        group = make_group("x")
        stream.add(group)
        assert_same(stream.read("rank0", count=1, timeout_s=5)[0][1], group)


def test_a_group_whose_parts_disagree_is_refused():
    group = make_group("x", steps=3)
    with pytest.raises(ValueError, match="3-step group"):
        Group(**{**vars(group), "log_probs": torch.zeros(2, 3)})  # one log-prob per transition: N-1
    with pytest.raises(ValueError, match="each weighted reward"):
        Group(**{**vars(group), "weights": {"a": 1.0}})  # a score without a weight would leave the total
    with pytest.raises(ValueError, match="neither"):
        Group(**{**vars(group), "log_probs": None})  # states without their log-probs cannot be trained on
    with pytest.raises(ValueError, match="group of 3 needs states"):
        Group(**{**vars(group), "samples": torch.zeros(3, 3, 4, 4)})  # one sample per trajectory


def test_a_forward_objective_group_travels_without_its_trajectory(server):
    stream = ExperienceStream(server.address, "fwd")
    stream.create()
    group = Group(**{**vars(make_group("y")), "states": None, "log_probs": None})
    stream.add(group)
    got = stream.read("rank0", count=1, timeout_s=5)[0][1]
    assert_same(got, group)
    assert not got.has_trajectory and got.states is None


def test_the_stream_stays_bounded_over_many_cycles_and_keeps_what_a_group_still_needs(server):
    """Two consumer groups (two learner ranks): an entry goes once both acknowledged it, never before."""
    rank0, rank1 = (ExperienceStream(server.address, "bounded", learner_group(r)) for r in (0, 1))
    rank0.create()
    rank1.create()
    big = [Group(**{**vars(make_group("x", index=i)), "samples": torch.randn(2, 3, 64, 64)})  # ~100 kB an entry
           for i in range(120)]
    client = rank0.client
    used = []
    for cycle in range(40):
        for i in range(3):
            rank0.add(big[3 * cycle + i])
        first = rank0.read("r0", count=3, timeout_s=5)
        second = rank1.read("r1", count=3, timeout_s=5)
        rank0.ack([i for i, _ in first])
        assert rank0.trim() == 0 and rank0.length() == 3  # rank 1 has not acknowledged them yet
        rank1.ack([i for i, _ in second[:2]])
        assert rank0.trim() == 2 and rank0.length() == 1  # the one rank 1 still holds stays
        rank1.ack([second[2][0]])
        assert rank0.trim() == 1 and rank0.length() == 0
        used.append(int(client.info("memory")["used_memory"]))
    assert max(used[10:]) - used[10] < 1_000_000  # flat: 30 more cycles wrote ~9 MB


def test_a_batch_is_its_iterations_groups_whatever_order_they_arrived_in(server):
    """An async run's fast actor writes iteration 1 while a slow one still writes iteration 0. Would catch: the
    batch of iteration 0 taking a group of iteration 1 by stream order (a run state saved there loses the group
    left over and trains the taken one twice after a resume), and an early stop waiting for groups a rank holds."""
    def of(iteration: int, index: int) -> Group:
        return replace(make_group(f"p{index}", index=index), iteration=iteration)

    rank = ExperienceStream(server.address, "order")
    rank.create()
    for iteration, index in [(0, 0), (1, 2), (0, 1), (1, 3)]:
        rank.add(of(iteration, index))
    assert [(g.iteration, g.prompt_index) for _, g in rank.read("rank0", 2, 5, iteration=0)] == [(0, 0), (0, 1)]
    assert [(g.iteration, g.prompt_index) for _, g in rank.read("rank0", 2, 5, iteration=1)] == [(1, 2), (1, 3)]
    rank.add(of(0, 4))  # a group of an iteration already trained, not a copy of one: a count went wrong
    with pytest.raises(RuntimeError, match="earlier iteration was trained on too few groups"):
        rank.read("rank0", 1, 5, iteration=2)

    rank, driver = (ExperienceStream(server.address, "stop") for _ in range(2))
    rank.create()
    for iteration, index in [(3, 6), (2, 5), (3, 7)]:  # iterations 2 and 3 in flight
        rank.add(of(iteration, index))
    rank.ack([entry_id for entry_id, _ in rank.read("rank0", 1, 5, iteration=2)])  # trained; (3, 6) read ahead
    assert [g.prompt_index for _, g in rank.ahead] == [6] and rank.pending() == 1
    driver.discard(2, timeout_s=5)  # the run stops: iteration 3's two groups are acknowledged untrained
    assert driver.pending() == 0
    with pytest.raises(TimeoutError):
        driver.read("drain", 1, timeout_s=0.2)  # nothing left undelivered either


def test_entries_not_yet_read_by_every_group_are_kept(server):
    rank0, rank1 = (ExperienceStream(server.address, "unread", learner_group(r)) for r in (0, 1))
    rank0.create()
    rank1.create()
    ids = [rank0.add(make_group(f"p{i}", index=i)) for i in range(4)]
    rank0.ack([i for i, _ in rank0.read("r0", count=4, timeout_s=5)])
    rank1.ack([i for i, _ in rank1.read("r1", count=2, timeout_s=5)])  # rank 1 has not read the last two
    assert rank0.trim() == 2
    assert [i for i, _ in rank1.read("r1", count=2, timeout_s=5)] == ids[2:]


def test_the_embedded_server_caps_its_memory_and_refuses_dangerous_commands():
    with EmbeddedRedis(max_memory_mb=64) as s:
        client = s.address.connect()
        memory = client.info("memory")
        assert int(memory["maxmemory"]) == 64 * 2**20 and memory["maxmemory_policy"] == "volatile-lru"
        client.set("keep", "me")
        for command in ("FLUSHALL", "FLUSHDB", "CONFIG GET maxmemory", "DEBUG SLEEP 0", "KEYS *"):
            with pytest.raises(redis.ResponseError, match="unknown command"):
                client.execute_command(*command.split())
        assert client.get("keep") == b"me"
        with pytest.raises(redis.ResponseError, match="maxmemory"):  # past the cap a write fails; nothing is evicted
            for i in range(100):
                client.xadd("s", {"blob": b"x" * 2**20})
        assert client.get("keep") == b"me"


def test_clients_time_out_explicitly_and_never_retry_a_command(server):
    with EmbeddedRedis(host="127.0.0.1") as tcp:
        for client in (ExperienceStream(server.address, "t").client, ExperienceStream(tcp.address, "t").client):
            kwargs = client.connection_pool.connection_kwargs
            assert kwargs["socket_timeout"] > BLOCK_S  # (a unix socket connects under socket_timeout)
            assert client.get_retry().get_retries() == 0  # redis-py's default: 10 silent retries of any command
        assert kwargs["socket_connect_timeout"] <= 10
    stream = ExperienceStream(server.address, "slow")
    stream.create()
    start = time.monotonic()
    with pytest.raises(TimeoutError):  # a wait longer than one XREADGROUP block: looped, not a socket timeout
        stream.read("rank0", count=1, timeout_s=BLOCK_S + 1)
    assert time.monotonic() - start >= BLOCK_S + 1


def test_a_group_from_a_partly_stochastic_sampler_carries_one_log_prob_per_stochastic_transition(server):
    """grpo.stochastic_steps K: N states, K log-probs; the spec travels, so a learner of another K refuses it."""
    base = make_group("z", steps=5)
    spec = SamplerSpec("prox", 5, 1.0, 2.0, stochastic_steps=2)
    group = Group(**{**vars(base), "sampler": spec, "log_probs": torch.randn(2, 2)})
    with pytest.raises(ValueError, match=r"log_probs \[2, 2\]"):
        Group(**{**vars(group), "log_probs": torch.randn(2, 4)})  # N-1 log-probs from a K-stochastic sampler
    stream = ExperienceStream(server.address, "mixed")
    stream.create()
    stream.add(group)
    got = stream.read("rank0", count=1, timeout_s=5)[0][1]
    assert_same(got, group)
    assert got.sampler.stochastic_steps == 2 and got.sampler != base.sampler


def test_a_copy_of_a_group_read_ahead_is_skipped(server):
    """Would catch a group read ahead of its iteration is not remembered, so its copy is returned too."""
    stream = ExperienceStream(server.address, "ahead-dup")
    stream.create()

    def of(iteration, index):
        return replace(make_group(f"p{index}", index=index), iteration=iteration)

    ahead = of(1, 2)
    for group in (of(0, 0), ahead, ahead, of(0, 1), of(1, 3)):  # the copy arrives while the original waits ahead
        stream.add(group)
    stream.read("rank0", 2, 5, iteration=0)
    got = [g.prompt_index for _, g in stream.read("rank0", 2, 5, iteration=1)]
    assert got == [2, 3] and stream.duplicates == 1


def test_a_group_with_the_wrong_number_of_states_is_refused():
    """Would catch a group whose states are not N long is accepted from the wire."""
    group = make_group("x", steps=3)
    with pytest.raises(ValueError, match="3-step group"):
        replace(group, states=torch.randn(2, 4, 3, 4, 4))


def test_a_group_with_a_score_per_image_of_another_group_size_is_refused():
    """Every weighted reward holds one score per image of the group: a score vector of another length (a reward
    actor's batch split at the wrong place) would broadcast or fail only later in the total. Would catch the shape
    check dropped (only the reward names compared)."""
    group = make_group("x", g=2)
    for bad in (torch.rand(3), torch.rand(1), torch.rand(2, 1)):
        with pytest.raises(ValueError, match="each weighted reward"):
            Group(**{**vars(group), "scores": {"a": bad, "b": torch.rand(2)}})


def test_a_redis_url_redis_py_cannot_read_gives_advice():
    """A port that is not a number: redis-py raises ValueError while parsing, which reached the driver as a
    traceback without the advice. Would catch ValueError dropped from the errors connect() turns into advice."""
    with pytest.raises(ConnectionError, match="cannot reach Redis .*ValueError.*redis.url"):
        RedisAddress(url="redis://127.0.0.1:sixthree/0").connect()


def test_only_its_owner_can_reach_the_servers_socket():
    """Would catch the unix socket opened to every local user (unixsocketperm 777), and its folder left open."""
    import stat

    with EmbeddedRedis() as s:
        assert stat.S_IMODE(os.stat(s.socket).st_mode) & 0o077 == 0
        assert stat.S_IMODE(os.stat(s.dir).st_mode) == 0o700


def test_close_stops_the_server_and_removes_its_folder():
    """Would catch close() leaving the server's folder (socket, log) behind."""
    with EmbeddedRedis() as s:
        folder, proc = s.dir, s.proc
    assert proc.poll() is not None and not folder.exists()


def test_a_killed_driver_leaves_no_server_behind():
    """A driver SIGKILLed before close(): its embedded redis-server must die with it, not hold the stream's memory
    and its socket forever. Would catch the parent-death signal not set in the server's process."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the "driver": starts a server, reports its pid, waits to be killed
        try:
            os.close(read)
            s = EmbeddedRedis()
            os.write(write, str(s.proc.pid).encode())
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(write)
    try:
        pid = int(os.read(read, 32) or 0)
    finally:
        os.close(read)
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
    assert pid
    deadline = time.monotonic() + 5
    while True:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:  # (gone between two checks, or before the first)
            break
        if time.monotonic() > deadline:
            psutil.Process(pid).kill()
            pytest.fail("the embedded redis-server outlived the process that started it")
        time.sleep(0.05)


def test_cluster_mode_on_an_ipv6_address(ipv6_loopback):
    """A driver whose cluster-internal address is IPv6: the URL must bracket it (redis://[::1]:port/0). Would catch
    the host put in the URL bare, which redis-py cannot read."""
    with EmbeddedRedis(host=ipv6_loopback) as s:
        assert s.address.url.startswith("redis://[::1]:")
        stream = ExperienceStream(s.address, "t")
        stream.create()
        group = make_group("x")
        stream.add(group)
        assert_same(stream.read("rank0", count=1, timeout_s=5)[0][1], group)


def test_groups_read_ahead_of_two_later_iterations_each_wait_for_their_own_read(server):
    """Iteration 0's read takes groups of iterations 1 and 2 on its way. Would catch the read of iteration 1
    forgetting the group of iteration 2 it was not asked for (iteration 2 then stalls, its group never trained)."""
    stream = ExperienceStream(server.address, "two-ahead")
    stream.create()
    for iteration, index in [(1, 4), (2, 8), (0, 0)]:
        stream.add(replace(make_group(f"p{index}", index=index), iteration=iteration))
    assert [g.prompt_index for _, g in stream.read("rank0", 1, 5, iteration=0)] == [0]
    assert [g.prompt_index for _, g in stream.read("rank0", 1, 5, iteration=1)] == [4]
    assert [g.prompt_index for _, g in stream.read("rank0", 1, 1, iteration=2)] == [8]


def test_a_read_gives_up_at_its_own_timeout_not_at_the_end_of_a_block(server):
    """Would catch the read blocking a whole BLOCK_S on an empty stream whatever its timeout (a learner asked to
    wait 0.3 s would wait 5 s, and a run's end would wait BLOCK_S per rank)."""
    stream = ExperienceStream(server.address, "short")
    stream.create()
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="delivered 0 of 1 groups in 0.3 s"):
        stream.read("rank0", count=1, timeout_s=0.3)
    assert time.monotonic() - start < BLOCK_S / 2


def test_an_early_stop_acknowledges_every_group_a_rank_holds(server):
    """Two groups of the next iteration wait, read ahead, when the run stops. Would catch only the first of the
    held entries acknowledged (the drain then waits for groups that never come)."""
    stream = ExperienceStream(server.address, "held")
    stream.create()
    for iteration, index in [(1, 2), (1, 3), (0, 0)]:
        stream.add(replace(make_group(f"p{index}", index=index), iteration=iteration))
    stream.ack([entry_id for entry_id, _ in stream.read("rank0", 1, 5, iteration=0)])
    assert stream.pending() == 2
    ExperienceStream(server.address, "held").discard(2, timeout_s=1)
    assert stream.pending() == 0


def test_the_servers_memory_is_reported_in_megabytes_or_not_at_all(server):
    """Would catch bytes reported as megabytes (a monitor comparing it to redis.max_memory_mb), and a server whose
    ACL refuses INFO ending the run instead of going unreported."""
    stream = ExperienceStream(server.address, "mem")
    used = stream.client.info("memory")["used_memory"]
    assert stream.server_memory_mb() == pytest.approx(used / 2**20, rel=0.2) and 0 < stream.server_memory_mb() < 64
    stream.client.acl_setuser("watcher", enabled=True, passwords=["+watch"], keys=["*"], commands=["+@all", "-info"])
    stream.client = redis.Redis(unix_socket_path=server.socket, username="watcher", password="watch")
    assert stream.server_memory_mb() is None


def test_a_stream_no_learner_reads_yet_is_not_trimmed(server):
    """Groups written before any learner rank created its consumer group are still owed to it. Would catch trim()
    failing (or deleting) when the stream has no consumer group."""
    stream = ExperienceStream(server.address, "early")
    stream.add(make_group("x"))
    assert stream.trim() == 0 and stream.length() == 1


def test_reward_weights_survive_the_wire_exactly(server):
    """The learner recomputes the total from the weights the group carries. Would catch weights rounded or cast
    to float32 in the JSON payload (the rollout's and the learner's totals would then disagree)."""
    stream = ExperienceStream(server.address, "weights")
    stream.create()
    group = replace(make_group("x"), weights={"a": 1 / 3, "b": 0.1 + 0.2})
    stream.add(group)
    got = stream.read("rank0", 1, 5)[0][1]
    assert got.weights == group.weights and torch.equal(got.reward, group.reward)


def test_a_read_that_skipped_a_copy_returns_no_more_groups_than_asked(server):
    """The first reply holds a group and its copy: one more group is owed, not two. Would catch the next
    XREADGROUP asking for the whole count again (a batch one group too large, taken from the next batch)."""
    stream = ExperienceStream(server.address, "count")
    stream.create()
    first = make_group("p0", index=0)
    for group in (first, first, make_group("p1", index=1), make_group("p2", index=2)):
        stream.add(group)
    assert [g.prompt_index for _, g in stream.read("rank0", 2, 5)] == [0, 1] and stream.duplicates == 1
    assert stream.pending() == 2  # the copy was acknowledged, not left pending for ever
    assert [g.prompt_index for _, g in stream.read("rank0", 1, 5)] == [2]


def test_trim_deletes_exactly_the_acknowledged_entries_of_small_groups(server):
    """Small entries share a stream node (Redis packs them up to 4 kB a node): trim must still delete each
    acknowledged one, not only whole nodes. Would catch an approximate XTRIM (~), which deletes none of these."""
    stream = ExperienceStream(server.address, "small")
    stream.create()
    for i in range(10):
        stream.add(Group("x", i, 0, 0, SamplerSpec("prox", 2, 1.0, 1.0), scores={"a": torch.rand(1)},
                         weights={"a": 1.0}, samples=torch.zeros(1, 1, 1, 1)))
    stream.ack([entry_id for entry_id, _ in stream.read("rank0", 6, 5)])
    assert stream.trim() == 6 and stream.length() == 4


def test_log_probs_without_their_states_are_refused():
    """Would catch only the one direction checked (states without log-probs): a group carrying log-probs but no
    states would reach a policy-gradient learner as a forward-objective group."""
    with pytest.raises(ValueError, match="neither"):
        Group(**{**vars(make_group("x")), "states": None})


def test_a_group_whose_tensors_share_memory_travels(server):
    """safetensors refuses to save tensors whose memory overlaps: here one score tensor weighted under two names
    (the same scorer listed twice). Would catch the payload written from the tensors as given, not from copies."""
    stream = ExperienceStream(server.address, "shared-memory")
    stream.create()
    score = torch.rand(2)
    group = replace(make_group("x"), scores={"a": score, "b": score})
    stream.add(group)
    assert_same(stream.read("rank0", 1, 5)[0][1], group)
