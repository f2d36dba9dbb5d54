"""Interconnects: the bandwidth a collective gets inside a node and between nodes.

Figures are per GPU and per direction, in bytes/s, from the vendors' datasheets (NVLink's
"600 GB/s" on an A100 is both directions added: 300 GB/s each way). Collectives run as rings:
an all-reduce of S bytes over n ranks moves 2(n - 1)/n x S through each GPU's link, an
all-gather or reduce-scatter (n - 1)/n x S, an all-to-all (n - 1)/n x S, a pipeline send S.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphcost.errors import ConfigError

GB = 1e9


@dataclass(frozen=True)
class Link:
    name: str
    bytes_per_s: float  # per GPU, one direction
    description: str = ""


LINKS: dict[str, Link] = {link.name: link for link in [
    Link("nvlink3", 300 * GB, "NVLink 3 (A100 SXM): 600 GB/s both directions"),
    Link("nvlink4", 450 * GB, "NVLink 4 (H100/H200 SXM): 900 GB/s both directions"),
    Link("nvlink5", 900 * GB, "NVLink 5 (B200): 1.8 TB/s both directions"),
    Link("xgmi", 448 * GB, "AMD Infinity Fabric (MI300X): 7 links x 64 GB/s"),
    Link("pcie4", 32 * GB, "PCIe 4.0 x16"),
    Link("pcie5", 64 * GB, "PCIe 5.0 x16"),
    Link("ib-hdr", 25 * GB, "InfiniBand HDR, 200 Gb/s per GPU"),
    Link("ib-ndr", 50 * GB, "InfiniBand NDR, 400 Gb/s per GPU"),
]}

# The usual node of each device preset: (link inside the node, link between nodes, GPUs/node).
NODES = {
    "a100-40gb": ("nvlink3", "ib-hdr", 8), "a100-80gb": ("nvlink3", "ib-hdr", 8),
    "a100-80gb-pcie": ("pcie4", "ib-hdr", 8), "h100-sxm": ("nvlink4", "ib-ndr", 8),
    "h100-pcie": ("pcie5", "ib-ndr", 8), "h200": ("nvlink4", "ib-ndr", 8),
    "b200": ("nvlink5", "ib-ndr", 8), "mi300x": ("xgmi", "ib-ndr", 8),
    "rtx3090": ("pcie4", "ib-hdr", 4), "rtx4090": ("pcie4", "ib-hdr", 4),
    "l4": ("pcie4", "ib-hdr", 8), "l40s": ("pcie4", "ib-ndr", 8),
}


@dataclass(frozen=True)
class Network:
    intra: Link  # between the GPUs of a node
    inter: Link  # between nodes
    gpus_per_node: int

    def link(self, group_size: int, stride: int) -> Link:
        """The link a group of `group_size` ranks `stride` apart uses: inside the node when
        the whole group fits in one."""
        return self.intra if group_size * stride <= self.gpus_per_node else self.inter


def network_for(device_name: str, *, intra: str | float | None = None,
                inter: str | float | None = None,
                gpus_per_node: int | None = None) -> Network:
    """The device's usual node, with any of its figures overridden (a link name, or GB/s)."""
    default = NODES.get(device_name, ("pcie4", "ib-hdr", 8))

    def pick(value, fallback: str, where: str) -> Link:
        if value is None:
            return LINKS[fallback]
        if isinstance(value, (int, float)):
            if value <= 0:
                raise ConfigError(f"{where} must be a positive bandwidth in GB/s, got {value}")
            return Link(f"{value:g} GB/s", value * GB)
        if value not in LINKS:
            raise ConfigError(f"unknown link {value!r} for {where}; use one of "
                              f"{', '.join(LINKS)} or a bandwidth in GB/s")
        return LINKS[value]

    per_node = gpus_per_node or default[2]
    if per_node < 1:
        raise ConfigError(f"--gpus-per-node must be at least 1, got {per_node}")
    return Network(pick(intra, default[0], "--intra-node"), pick(inter, default[1],
                                                                   "--inter-node"), per_node)


def all_reduce_bytes(size: float, ranks: int) -> float:
    return 2 * (ranks - 1) / ranks * size if ranks > 1 else 0.0


def all_gather_bytes(size: float, ranks: int) -> float:
    """Also a reduce-scatter's and an all-to-all's: `size` is the full (unsharded) tensor."""
    return (ranks - 1) / ranks * size if ranks > 1 else 0.0
