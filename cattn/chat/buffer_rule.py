"""The paper's buffer rule, measured per session: how many of a history's first layers must be in
device pages before the forward starts for the rest to stream in behind the compute.

`preload_layers` (`cattn.store.transfer`) gives ``k`` from one layer's copy time and one layer's
compute time. A `ChatSession` measures the compute (its last prefill's median time per layer
and new token, `PagedCache.layer_seconds`) and the host-to-device copy bandwidth (once per
device and process); `BufferRule` turns them into the layers to copy ahead of a turn, and the
layers a device tier keeps resident after it. Before the first measurement every layer counts.
"""
from __future__ import annotations

import torch

from cattn.store.transfer import copy_bandwidth, preload_layers

_bandwidth: dict[torch.device, float] = {}   # measured host->device copy bandwidth, once per device


def bandwidth(device: torch.device | str) -> float:
    """Host-to-device copy bytes per second on ``device``, measured on first use."""
    device = torch.device(device)
    if device not in _bandwidth:
        _bandwidth[device] = copy_bandwidth(device, nbytes=(64 if device.type == "cuda" else 8) << 20)
    return _bandwidth[device]


class BufferRule:
    """One session's ``k``, from what its turns measured.

    Args:
        num_layers: the model's layers.
        token_nbytes: bytes of K and V of one token over all layers.
    """

    def __init__(self, num_layers: int, token_nbytes: int):
        self.num_layers, self.token_nbytes = num_layers, token_nbytes
        self.layer_s_per_token: float | None = None   # one layer's prefill compute per new token
        self.resident: int | None = None               # k for the device tier, at the last turn's end

    def measured(self, layer_seconds: tuple[int, float] | None) -> None:
        """Take a turn's ``(new tokens, seconds per layer)`` (`PagedCache.layer_seconds`), if any."""
        if layer_seconds is not None:
            self.layer_s_per_token = layer_seconds[1] / layer_seconds[0]

    def preload(self, layer_nbytes: float, device: torch.device, new_tokens: int, resident_layers: int) -> int:
        """Layers to copy before the forward of a turn of ``new_tokens`` whose history has ``layer_nbytes``
        per layer, beyond the ``resident_layers`` already in place (they are the first of the ``k``)."""
        if self.layer_s_per_token is None:
            return self.num_layers
        k = preload_layers(self.num_layers, layer_nbytes / bandwidth(device), self.layer_s_per_token * new_tokens)
        return max(0, k - resident_layers)

    def resident_layers(self, history_tokens: int, device: torch.device, new_tokens: int) -> int:
        """The ``k`` a device tier keeps for a history of ``history_tokens`` whose next turn is like this one
        (``new_tokens`` new); remembered for `keep`."""
        if self.layer_s_per_token is not None and history_tokens:
            layer_nbytes = history_tokens * self.token_nbytes // self.num_layers
            self.resident = preload_layers(self.num_layers, layer_nbytes / bandwidth(device),
                                           self.layer_s_per_token * max(new_tokens, 1))
        return self.keep()

    def disk_tokens(self, history: int, in_dram: int, new_tokens: int, disk_bytes_per_s: float | None) -> int:
        """How many of a history's ``history`` tokens to load when only the first ``in_dram`` are in DRAM and
        the rest stream from disk, layer by layer, while the GPU prefills the tokens not loaded and the
        ``new_tokens``: the split whose turn ends first (the replay's partial-read model). The turn takes
        max(read, prefill) plus one layer of the read (the first layer waits for it); the read grows with
        the split and the prefill shrinks, so the best split is where they cross, or an end. Every token
        before a measurement, or without the disk's bandwidth."""
        if self.layer_s_per_token is None or not disk_bytes_per_s or history <= in_dram:
            return history
        read_s = self.token_nbytes / disk_bytes_per_s           # per token, all layers
        prefill_s = self.layer_s_per_token * self.num_layers     # per token, all layers

        def turn_s(p: int) -> float:
            read, prefill = (p - in_dram) * read_s, (new_tokens + history - p) * prefill_s
            return max(read, prefill) + read / self.num_layers

        cross = in_dram + (new_tokens + history - in_dram) * prefill_s / (read_s + prefill_s)
        near = {min(max(int(cross) + d, in_dram), history) for d in (0, 1)}
        return min({in_dram, history} | near, key=lambda p: (turn_s(p), -p))

    def keep(self) -> int:
        """The last ``k`` for the device tier: every layer before a measurement."""
        return self.num_layers if self.resident is None else self.resident
