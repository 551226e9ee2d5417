"""The experience stream on a real (embedded) redis-server: auth, safetensors payloads, ack semantics."""

import pytest
import redis
import torch

from actors.stream import EmbeddedRedis, ExperienceStream, RedisAddress


@pytest.fixture()
def server():
    with EmbeddedRedis() as s:
        yield s


def test_server_requires_the_password_and_opens_no_tcp_port(server):
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(unix_socket_path=server.socket).ping()
    with pytest.raises(ConnectionError, match="cannot reach Redis"):
        RedisAddress(unix_socket=server.socket, password="wrong").connect()
    assert redis.Redis(unix_socket_path=server.socket, password=server.password).config_get("port")["port"] == "0"


def test_groups_round_trip_and_are_pending_until_acked(server):
    stream = ExperienceStream(server.address, "t")
    stream.create()
    stream.create()  # idempotent
    tensors = {"states": torch.randn(2, 3, 4), "log_probs": torch.randn(2, 2), "reward": torch.tensor([0.1, 0.9])}
    ids = [stream.add({"prompt": f"p{i}", "policy_version": i}, tensors) for i in range(3)]
    got = stream.read("rank0", count=3, timeout_s=5)
    assert [g[0] for g in got] == ids
    assert [g[1]["prompt"] for g in got] == ["p0", "p1", "p2"]
    for _, _, t in got:
        for k, v in tensors.items():
            assert torch.equal(t[k], v)
    assert stream.pending() == 3
    assert stream.ack(ids[:2]) == 2 and stream.pending() == 1
    assert stream.ack(ids) == 1 and stream.pending() == 0
    with pytest.raises(TimeoutError):
        stream.read("rank0", count=1, timeout_s=0.2)  # nothing new: no entry is delivered twice


def test_payloads_are_not_pickles(server):
    stream = ExperienceStream(server.address, "t")
    stream.create()
    entry = stream.add({"prompt": "x"}, {"a": torch.zeros(1)})
    raw = stream.client.xrange(stream.key, entry, entry)[0][1]
    assert set(raw) == {b"meta", b"tensors"}
    assert not raw[b"tensors"].startswith(b"\x80")  # pickle protocol marker
    assert raw[b"meta"] == b'{"prompt": "x"}'


def test_unreachable_redis_gives_advice():
    with pytest.raises(ConnectionError, match="redis.url"):
        RedisAddress(url="redis://127.0.0.1:1/0").connect()


def test_cluster_mode_listens_on_the_given_address_only_with_the_given_password():
    with EmbeddedRedis(host="127.0.0.1", password="from-the-environment") as s:
        assert s.socket is None and s.address.url.startswith("redis://127.0.0.1:")
        client = s.address.connect()
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("unixsocket")["unixsocket"] == ""
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(s.address.url).ping()
        stream = ExperienceStream(s.address, "t")
        stream.create()
        stream.add({"prompt": "x"}, {"a": torch.ones(2)})
        assert torch.equal(stream.read("rank0", count=1, timeout_s=5)[0][2]["a"], torch.ones(2))
