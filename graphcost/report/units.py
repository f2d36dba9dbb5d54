"""Stage 5: an Analysis as plain text. The only place in graphcost where units are formatted.

Bytes are binary (1 KiB = 1024 B, 1 GiB = 2**30 B); FLOPs are decimal (1 TFLOP = 10**12 FLOP);
counts carry thousands separators and a short form (6.74 B = 6.74 * 10**9).

    >>> format_bytes(26_953_662_464), format_flops(29_261_612_187_648), format_count(6_738_415_616)
    ('25.10 GiB', '29.26 TFLOP', '6,738,415,616')
    >>> format_count_short(6_738_415_616)
    '6.74 B'
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
FLOP_UNITS = ("FLOP", "KFLOP", "MFLOP", "GFLOP", "TFLOP", "PFLOP", "EFLOP", "ZFLOP", "YFLOP")
COUNT_UNITS = ("", "K", "M", "B", "T")
UNITS_NOTE = ("units: bytes binary (1 GiB = 2^30 B); FLOPs decimal (1 TFLOP = 10^12), 2 per "
              "multiply-add")


def _scaled(value: float, units: Sequence[str], base: int) -> tuple[float, str]:
    i = 0
    while abs(value) >= base and i < len(units) - 1:
        value /= base
        i += 1
    return value, units[i]


def format_bytes(n: float) -> str:
    """Binary units: '512 B', '1.50 KiB', '25.10 GiB'."""
    value, unit = _scaled(n, BYTE_UNITS, 1024)
    return f"{int(value)} B" if unit == "B" else f"{value:.2f} {unit}"


def format_flops(n: float) -> str:
    """Decimal units: '0 FLOP', '98.30 MFLOP', '29.26 TFLOP'."""
    value, unit = _scaled(n, FLOP_UNITS, 1000)
    return f"{int(value)} FLOP" if unit == "FLOP" else f"{value:.2f} {unit}"


def format_count(n: int) -> str:
    """Exact, with thousands separators: '6,738,415,616'."""
    return f"{n:,}"


def format_count_short(n: float) -> str:
    """'6.74 B', '124.44 M', '512'."""
    value, unit = _scaled(n, COUNT_UNITS, 1000)
    return f"{int(value)}" if not unit else f"{value:.2f} {unit}"


def format_flops_per_s(x: float) -> str:
    """Peak throughput: '989.40 TFLOP/s'."""
    value, unit = _scaled(x, FLOP_UNITS, 1000)
    return f"{value:.2f} {unit}/s"


def format_bandwidth(x: float) -> str:
    """Memory bandwidth in decimal units, as vendors quote it: '3.35 TB/s' (1 TB = 10^12 B)."""
    value, unit = _scaled(x, ("B", "KB", "MB", "GB", "TB", "PB"), 1000)
    return f"{value:.2f} {unit}/s"


def format_seconds(s: float) -> str:
    """Time, from nanoseconds to days: '850.00 ns', '412.30 ms', '1.23 s', '5.50 min', '1.48 days'.

    >>> format_seconds(0.3835), format_seconds(128_008.1), format_seconds(0)
    ('383.50 ms', '1.48 days', '0 s')
    """
    for limit, unit in ((86400, "days"), (3600, "h"), (60, "min"), (1, "s"), (1e-3, "ms"),
                        (1e-6, "µs"), (1e-9, "ns")):
        if abs(s) >= limit:
            return f"{s / limit:.2f} {unit}"
    return "0 s" if s == 0 else f"{s * 1e9:.2f} ns"


def format_share(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, align: str = "") -> str:
    """Plain aligned columns. `align` has one letter per column, "l" or "r"; by default the first
    column is flush left and the others flush right.

    >>> print(table(["op", "calls"], [["mm", "12"]]))
    op  calls
    --  -----
    mm     12
    """
    rows = [list(map(str, r)) for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])

