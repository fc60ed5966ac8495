"""sRGB colours as DICOM RecommendedDisplayCIELabValue (PS3.3 C.10.7.1.1)."""

from __future__ import annotations

# CIE D65 reference white, the white point of sRGB (IEC 61966-2-1).
_WHITE = (0.95047, 1.0, 1.08883)


def _linear(channel: int) -> float:
    # IEC 61966-2-1: the sRGB transfer curve, undone.
    c = channel / 255.0
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def _f(t: float) -> float:
    delta = 6.0 / 29.0
    return t ** (1.0 / 3.0) if t > delta**3 else t / (3 * delta**2) + 4.0 / 29.0


def rgb_to_dicom_lab(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """An 8-bit sRGB colour as the three unsigned 16-bit values DICOM stores for CIELab.

    PS3.3 C.10.7.1.1: L* 0..100 maps to 0..0xFFFF, a* and b* -128..127 map to 0..0xFFFF.
    """
    r, g, b = (_linear(c) for c in rgb)
    x = 0.4124564 * r + 0.3575761 * g + 0.1804375 * b
    y = 0.2126729 * r + 0.7151522 * g + 0.0721750 * b
    z = 0.0193339 * r + 0.1191920 * g + 0.9503041 * b
    fx, fy, fz = _f(x / _WHITE[0]), _f(y / _WHITE[1]), _f(z / _WHITE[2])
    lightness = 116.0 * fy - 16.0
    a_star = 500.0 * (fx - fy)
    b_star = 200.0 * (fy - fz)

    def scaled(value: float, low: float, high: float) -> int:
        clipped = min(max(value, low), high)
        return round((clipped - low) / (high - low) * 0xFFFF)

    return (
        scaled(lightness, 0.0, 100.0),
        scaled(a_star, -128.0, 127.0),
        scaled(b_star, -128.0, 127.0),
    )
