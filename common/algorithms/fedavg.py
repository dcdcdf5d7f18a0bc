"""FedAvg (McMahan et al. 2017): the clients train the shared meme on cross-entropy; the
server averages it. Nothing private: the client's model is the global one."""

from __future__ import annotations

from common.algorithms.base import Algorithm, Slot


class FedAvg(Algorithm):
    name = "fedavg"
    summary = "the meme only, cross-entropy, averaged (McMahan et al. 2017)"
    slots = (Slot("meme", shared=True, arch="meme"),)


ALGORITHM = FedAvg()
