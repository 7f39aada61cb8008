"""Human-readable numbers, shared by the libraries and the CLI."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def binary_bytes(n: float, grouped: bool = False) -> str:
    """Binary units (device memory is sold in GiB): 37.06 GiB, 192.00 MiB, 512 B; `grouped`
    adds thousands separators (1,024.00 GiB)."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            value = n / (1 << shift)
            return f"{value:,.2f} {unit}" if grouped else f"{value:.2f} {unit}"
    return f"{int(n)} B"


def human_count(n: float, digits: int = 1) -> str:
    """1.2 B, 17.8 M, 3.0 K parameters (decimal units)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.{digits}f} {unit}"
    return str(int(n))
