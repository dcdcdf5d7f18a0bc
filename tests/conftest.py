"""Shared test helpers: real Flower messages and contexts, and a real local SuperLink."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

# Tests keep their dataset/partition caches apart from the user's (~/.cache/fedmutual);
# set before any test module imports common.datasets, inherited by every flwr process.
_OWN_CACHE = None if "FEDMUTUAL_CACHE" in os.environ else tempfile.mkdtemp(
    prefix="fedmutual-test-cache-")
if _OWN_CACHE:
    os.environ["FEDMUTUAL_CACHE"] = _OWN_CACHE

# Every simulation a test starts gets a Ray instance of its own, even while another test
# (another pytest-xdist worker) runs one: Ray would otherwise join the latest local
# cluster it finds. The Ray-cluster test names its cluster explicitly.
os.environ.setdefault("RAY_ADDRESS", "local")

import pytest  # noqa: E402
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict  # noqa: E402

from common.flwr_local import ROOT, SimLink, flwr_env, free_port  # noqa: E402

__all__ = ["ROOT", "flwr_env", "free_port", "make_context", "make_message", "task_config"]


def make_message(content: RecordDict, message_type: str = MessageType.TRAIN) -> Message:
    """A message as the SuperNode would hand it to a ClientApp handler."""
    meta = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7,
                    reply_to_message_id="", group_id="1", created_at=time.time(),
                    ttl=3600.0, message_type=message_type)
    return Message(content=content, metadata=meta)


def make_context(run_config: dict, partition_id: int = 0, num_partitions: int = 3) -> Context:
    """A node's context: its partition and an empty state."""
    return Context(run_id=1, node_id=7, node_config={"partition-id": partition_id,
                                                      "num-partitions": num_partitions},
                   state=RecordDict(), run_config=run_config)


def task_config(channels: int, size: int, classes: int, server_round: int = 1) -> ConfigRecord:
    """The config the server sends: task shape and round."""
    return ConfigRecord({"channels": channels, "size": size, "num-classes": classes,
                         "server-round": server_round})


@pytest.fixture(scope="session")
def simlink(tmp_path_factory):
    """One simulation SuperLink for the whole test session."""
    with SimLink(tmp_path_factory.mktemp("flwr-home")) as link:
        yield link


def pytest_sessionfinish(session, exitstatus):
    """Remove the test session's own cache folder."""
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
