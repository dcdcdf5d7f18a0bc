"""Shared test helpers: real Flower messages and contexts, and a real local SuperLink."""

from __future__ import annotations

import time

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from simulations.flwr_local import ROOT, SimLink, flwr_env, free_port

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
