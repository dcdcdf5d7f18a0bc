"""Who the clients are: each node identifies itself once by a stable client key, and
sampling and aggregation follow that key's order, so the same seed gives the same run
although Flower's node ids are random. Waiting for clients is always bounded.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from logging import ERROR, INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from common.config import Config

UNKNOWN_KEY = 2**62  # nodes that failed to identify sort last, by node id


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
    """The nodes' client keys and what they reported when identified."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.keys: dict[int, int] = {}  # node id -> client key
        self.info: dict[int, MetricRecord] = {}  # node id -> its identify reply
        self._unidentified: set[int] = set()  # silent at identification: asked again
        self._duplicates: set[int] = set()  # reported a key another node has: left out
        self.errors: dict[int, str] = {}  # node -> why its last identify reply failed

    def key_of(self, node: int) -> int:
        """The node's client key (``UNKNOWN_KEY`` if it never identified)."""
        return self.keys.get(node, UNKNOWN_KEY)

    def largest_train_split(self) -> int | None:
        """The largest train split the identified clients reported (None: none yet)."""
        sizes = [int(m["num-train"]) for m in self.info.values()]
        return max(sizes) if sizes else None

    def identify(self, grid: Grid, timeout: float | None = None) -> None:
        """Ask every not-yet-known connected node for its client key (one QUERY each).

        A node that stays silent past ``round-timeout`` (a slow cold start) sorts last by
        node id this round, which is not reproducible, and is asked again next round. A node
        that reports the key of another connected node is left out (two nodes with one key
        would share shuffling, initialisation and state file) and asked again next round."""
        live = list(grid.get_node_ids())
        new = [n for n in live if n not in self.keys or n in self._unidentified
               or n in self._duplicates]
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
            answered.add(node)
            self._unidentified.discard(node)
            if reply.has_error():
                log(WARNING, "node %d did not identify itself: %s", node, reply.error.reason)
                self.errors[node] = reply.error.reason
                continue
            self.errors.pop(node, None)
            metrics = reply.content["metrics"]
            key = int(metrics["client-key"])
            holder = holders.get(key)
            if holder is not None and holder != node:
                if node not in self._duplicates:
                    log(ERROR, "node %d reports client key %d, which node %d already has: it "
                        "is left out until that key is free. Give each node its own "
                        "'client-key' in --node-config, or its own state-dir", node, key,
                        holder)
                self._duplicates.add(node)
                self.keys.pop(node, None)
                continue
            self._duplicates.discard(node)
            self.keys[node] = key
            holders[key] = node
            self.info[node] = metrics
        for node in new:
            if node in self._duplicates:
                continue
            if node not in answered and node not in self._unidentified:
                log(WARNING, "node %d did not identify itself within round-timeout=%g s: it "
                    "is sampled by node id (not reproducible) until it does", node,
                    self.cfg.round_timeout)
                self._unidentified.add(node)
            self.keys.setdefault(node, UNKNOWN_KEY + node % 2**61)

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


def cyclic_sample(ids: list[int], k: int, server_round: int,
                  pass_seed: Callable[[int], int]) -> list[int]:
    """Round ``server_round``'s ``k`` clients under ``client-sampling = "cyclic"``.

    The clients (``ids``, in key order) are laid out as pass after pass, each pass a
    shuffle seeded by ``pass_seed(pass)``, and round r takes the next k of that sequence;
    so every client is sampled once per pass, and a round that straddles two passes skips
    the clients it already has.
    """
    n = len(ids)
    k = min(k, n)
    chosen: list[int] = []
    shuffles: dict[int, list[int]] = {}
    pos = (server_round - 1) * k
    while len(chosen) < k:
        pass_no, i = divmod(pos, n)
        if pass_no not in shuffles:
            shuffles[pass_no] = random.Random(pass_seed(pass_no)).sample(range(n), n)
        node = ids[shuffles[pass_no][i]]
        if node not in chosen:
            chosen.append(node)
        pos += 1
    return chosen
