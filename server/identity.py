"""Who the clients are: each node identifies itself once by a stable client key, and
sampling and aggregation follow that key's order, so the same seed gives the same run
although Flower's node ids are random. Waiting for clients is always bounded.
"""

from __future__ import annotations

import reprlib
import time
from collections.abc import Iterable, Mapping
from logging import ERROR, INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from common.config import Config

UNKNOWN_KEY = 2**62  # nodes that failed to identify sort last, by node id
# What an identify reply may claim (operator-side bounds: a value outside is refused, not
# trusted). Client keys lie in [0, UNKNOWN_KEY); the others are positive integers up to:
IDENTIFY_LIMITS = {"num-train": 10**9, "channels": 64, "size": 4096, "num-classes": 100_000}


class IdentifyError(ValueError):
    """An identify reply that is not what an honest client sends."""


def identify_info(content: RecordDict) -> dict[str, int]:
    """The checked facts of one identify reply: ``client-key`` and ``IDENTIFY_LIMITS``' keys.

    Whatever a node sends is hostile until checked here (a NaN key or a list would raise
    out of sorting and stop the run); unknown keys are dropped. Raises
    :class:`IdentifyError` saying what was expected.
    """
    record = content.get("metrics") if isinstance(content, RecordDict) else None
    if record is None:
        raise IdentifyError("no record named 'metrics': expected a MetricRecord 'metrics' "
                            "with 'client-key', 'num-train', 'channels', 'size', 'num-classes'")
    if not isinstance(record, MetricRecord):
        raise IdentifyError(f"record 'metrics' has type {type(record).__name__}: expected "
                            "a MetricRecord")
    return _checked_ints(record)


def _checked_ints(record: Mapping[str, object]) -> dict[str, int]:
    bounds = {"client-key": (0, UNKNOWN_KEY - 1), **{k: (1, hi) for k, hi in
                                                     IDENTIFY_LIMITS.items()}}
    info = {}
    for key, (lo, hi) in bounds.items():
        if key not in record:
            raise IdentifyError(f"'{key}' is missing: expected an integer in [{lo}, {hi}]")
        v = record[key]
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise IdentifyError(f"'{key}' = {_short(v)}: expected an integer in [{lo}, {hi}]")
        info[key] = int(v)
    if "num-test" in record:  # optional: bounds the node's evaluation weight when sent
        v = record["num-test"]
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= IDENTIFY_LIMITS[
                "num-train"]:
            raise IdentifyError(f"'num-test' = {_short(v)}: expected an integer in "
                                f"[0, {IDENTIFY_LIMITS['num-train']}]")
        info["num-test"] = int(v)
    return info


def _short(v: object) -> str:
    """A value for a log line, cut short (a hostile node may send a huge list)."""
    return reprlib.repr(v)


def _as_int(v: object) -> int | None:
    """``v`` as an int when it is one or a string of digits (JSON object keys), else None."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.isascii() and v.isdigit():
        return int(v)
    return None


class TooFewClients(RuntimeError):
    """Fewer than ``min-clients`` connected or answered within ``round-timeout``."""


class OrderedGrid:
    """A view of the grid whose node ids come sorted by client key (for seeded sampling)."""

    def __init__(self, grid: Grid, order: list[int]) -> None:
        self._grid, self._order = grid, order

    def get_node_ids(self) -> list[int]:
        return list(self._order)

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class ClientRegistry:
    """The nodes' client keys and what they reported (checked) when identified.

    Without ``node-authentication`` a node's claim of its key is trusted: first come first
    served among connected nodes. With it, Flower's node ids are authenticated, so each key
    is bound for the run to the first node id that claims it (:meth:`bindings`).
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.keys: dict[int, int] = {}  # node id -> client key
        self.info: dict[int, dict[str, int]] = {}  # node id -> its checked identify reply
        self._unidentified: set[int] = set()  # silent at identification: asked again
        self._duplicates: set[int] = set()  # reported a key another node has: left out
        self._rejected: set[int] = set()  # sent a malformed reply: left out, asked again
        self._bound: dict[int, int] = {}  # node-authentication: client key -> node id
        self._refused: dict[int, int] = {}  # node-authentication: node id -> key it spoofed
        self.errors: dict[int, str] = {}  # node -> why its last identify reply failed

    def key_of(self, node: int) -> int:
        """The node's client key (``UNKNOWN_KEY`` if it never identified)."""
        return self.keys.get(node, UNKNOWN_KEY)

    def largest_train_split(self) -> int | None:
        """The largest train split the identified clients reported (None: none yet)."""
        sizes = [int(m["num-train"]) for m in self.info.values()]
        return max(sizes) if sizes else None

    def bindings(self) -> dict[int, int]:
        """Client key -> node id, as ``node-authentication`` bound them: for the checkpoint,
        so a resumed run keeps refusing the nodes that claim another node's key."""
        return dict(self._bound)

    def restore_bindings(self, saved: Mapping[object, object]) -> None:
        """Take back :meth:`bindings` from a checkpoint (JSON turns the keys into strings),
        before the first identification. Raises ValueError on anything but key -> node id."""
        bound = {}
        for key, node in saved.items():
            k, n = _as_int(key), _as_int(node)
            if k is None or n is None or not 0 <= k < UNKNOWN_KEY or not 0 <= n < 2**64:
                raise ValueError(f"client-key binding {key!r} -> {node!r} is invalid: expected "
                                 f"a client key in [0, 2^62) -> a node id in [0, 2^64)")
            bound[k] = n
        self._bound = bound

    def identify(self, grid: Grid, timeout: float | None = None) -> None:
        """Ask every not-yet-known connected node for its client key (one QUERY each).

        A node that stays silent past ``round-timeout`` (a slow cold start) sorts last by
        node id this round, which is not reproducible, and is asked again next round. A
        malformed reply (see :func:`identify_info`) is refused: that node is left out and
        asked again next round. A node that reports the key of another connected node is
        left out (two nodes with one key would share shuffling, initialisation and state
        file) and asked again next round; with ``node-authentication``, one that claims a key
        bound to another node id is refused for the run and never asked again. Never raises
        on what a node sends."""
        live = list(grid.get_node_ids())
        new = [n for n in live if n not in self._refused and (
            n not in self.keys or n in self._unidentified or n in self._duplicates
            or n in self._rejected)]
        if not new:
            return
        msgs = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n,
                        message_type=MessageType.QUERY) for n in new]
        answered = set()
        connected = set(live)
        holders = {k: n for n, k in self.keys.items() if n in connected}  # key -> node
        wait = self.cfg.round_timeout if timeout is None else timeout
        for reply in grid.send_and_receive(msgs, timeout=wait):
            node = reply.metadata.src_node_id
            if node not in new or node in answered:
                continue  # not asked, or a second reply: nothing to learn from it
            answered.add(node)
            self._unidentified.discard(node)
            if reply.has_error():
                log(WARNING, "node %d did not identify itself: %s", node, reply.error.reason)
                self.errors[node] = reply.error.reason
                continue
            try:
                info = identify_info(reply.content)
            except IdentifyError as e:
                self._reject(node, f"malformed identify reply: {e}")
                continue
            self.errors.pop(node, None)
            self._rejected.discard(node)
            key = info["client-key"]
            if self.cfg.node_authentication:
                owner = self._bound.setdefault(key, node)
                if owner != node:
                    log(ERROR, "node %d claims client key %d, which is bound to node %d for "
                        "this run (node-authentication): node %d is refused for the run. "
                        "Give each node its own 'client-key' in --node-config, or its own "
                        "state-dir", node, key, owner, node)
                    self._refused[node] = key
                    self._forget(node)
                    continue
            else:
                holder = holders.get(key)
                if holder is not None and holder != node:
                    if node not in self._duplicates:
                        log(ERROR, "node %d reports client key %d, which node %d already "
                            "has: it is left out until that key is free. Give each node its "
                            "own 'client-key' in --node-config, or its own state-dir", node,
                            key, holder)
                    self._duplicates.add(node)
                    self._forget(node)
                    continue
            self._duplicates.discard(node)
            self.keys[node] = key
            holders[key] = node
            self.info[node] = info
        for node in new:
            if node in self._duplicates or node in self._rejected or node in self._refused:
                continue
            if node not in answered and node not in self._unidentified:
                log(WARNING, "node %d did not identify itself within round-timeout=%g s: it "
                    "is sampled by node id (not reproducible) until it does", node,
                    self.cfg.round_timeout)
                self._unidentified.add(node)
            self.keys.setdefault(node, UNKNOWN_KEY + node % 2**61)

    def _reject(self, node: int, reason: str) -> None:
        """Leave out a node whose identify reply was malformed; logged once per reason."""
        if self.errors.get(node) != reason:
            log(WARNING, "node %d is left out (asked again next round): %s", node, reason)
        self.errors[node] = reason
        self._rejected.add(node)
        self._duplicates.discard(node)
        self._forget(node)

    def _forget(self, node: int) -> None:
        """Drop what the node claimed before (it is not a client now)."""
        self.keys.pop(node, None)
        self.info.pop(node, None)

    def _wait_for_clients(self, grid: Grid, deadline: float) -> None:
        """Wait until ``deadline`` for ``min-clients`` connected nodes (Flower's own sampler
        would wait forever)."""
        last_log = 0.0
        while (n := len(list(grid.get_node_ids()))) < self.cfg.min_clients:
            now = time.monotonic()
            if now >= deadline:
                raise TooFewClients(
                    f"only {n} client(s) connected after waiting round-timeout="
                    f"{self.cfg.round_timeout:g} s, fewer than min-clients={self.cfg.min_clients}")
            if now - last_log >= 10:
                log(INFO, "waiting for clients: %d connected, min-clients=%d", n,
                    self.cfg.min_clients)
                last_log = now
            time.sleep(1)

    def ordered(self, grid: Grid) -> OrderedGrid:
        """The identified connected nodes, in key order, once at least ``min-clients`` are.

        One ``round-timeout`` bounds the waiting and the identification together: nodes
        that drop out (or turn out to be duplicates) during identification send it back to
        waiting, never into Flower's sampler, which would loop forever on the frozen list."""
        deadline = time.monotonic() + self.cfg.round_timeout
        while True:
            self._wait_for_clients(grid, deadline)
            self.identify(grid, timeout=max(1.0, deadline - time.monotonic()))
            live = list(grid.get_node_ids())
            if live and all(n in self.errors for n in live):
                node = live[0]
                raise TooFewClients(
                    f"every connected client failed to identify itself, so none can train "
                    f"(node {node}: {self.errors[node]}); fix what the message names, then "
                    "start the run again")
            ids = [n for n in live if n in self.keys]
            if len(ids) >= self.cfg.min_clients:
                return OrderedGrid(grid, sorted(ids, key=lambda n: (self.keys[n], n)))
            if time.monotonic() >= deadline:
                raise TooFewClients(
                    f"only {len(ids)} identified client(s) after waiting round-timeout="
                    f"{self.cfg.round_timeout:g} s, fewer than min-clients={self.cfg.min_clients}")
            time.sleep(1)

    def sort_replies(self, replies: Iterable[Message]) -> list[Message]:
        """Replies in client-key order (unknown nodes last, by node id)."""

        def key(m: Message) -> tuple[int, int]:
            node = m.metadata.src_node_id
            return self.keys.get(node, UNKNOWN_KEY), node

        return sorted(replies, key=key)
