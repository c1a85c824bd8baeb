#!/usr/bin/env python3
"""Fits the polynomials of rdrop-kernels' vectorisable f32 erf (rdrop-kernels/src/gelu.rs).

    |z| < 1:       erf(z)  = z * P(z^2)
    1 <= a <= 4:   erfc(a) = exp(-a^2) * R(t),  a = |z|,  t = (a - 2.5) / 1.5 in [-1, 1]
                   (erf(z) = sign(z) * (1 - erfc(a)); erf rounds to +-1 in f32 beyond 4)

P and R are Chebyshev-node least-squares fits (mpmath.chebyfit) in 40-digit arithmetic; the
variable t keeps R's monomial coefficients small (sum |c| < 0.5, no cancellation in f32).
Prints the coefficients highest degree first (Horner order) and each fit's maximum relative
error. Needs only mpmath:

    python3 scripts/fit_erf_f32.py
"""
import struct

import mpmath as mp

mp.mp.dps = 40


def p_target(u):
    # erf(sqrt(u)) / sqrt(u), with its limit 2/sqrt(pi) at u = 0.
    if u == 0:
        return 2 / mp.sqrt(mp.pi)
    s = mp.sqrt(u)
    return mp.erf(s) / s


def r_target(t):
    a = mp.mpf(2.5) + mp.mpf(1.5) * t
    return mp.erfc(a) * mp.exp(a * a)


def f32_literal(c):
    """The shortest decimal that reads back as the f32 nearest to c."""
    x = struct.unpack("f", struct.pack("f", float(c)))[0]
    for digits in range(6, 10):
        text = f"{x:.{digits}g}"
        if struct.unpack("f", struct.pack("f", float(text)))[0] == x:
            return text if "e" in text or "." in text else text + ".0"
    return repr(x)


for name, f, interval, degree in [
    ("ERF_P", p_target, [0, 1], 6),
    ("ERFC_R", r_target, [-1, 1], 11),
]:
    coeffs, _ = mp.chebyfit(f, interval, degree + 1, error=True)
    rel = max(
        abs(mp.polyval(coeffs, x) - f(x)) / abs(f(x))
        for x in mp.linspace(interval[0], interval[1], 2001)
    )
    print(f"/// degree {degree} on {interval}, max relative error {mp.nstr(rel, 3)}")
    print(f"const {name}: [f32; {degree + 1}] = [")
    for c in coeffs:
        print(f"    {f32_literal(c)},")
    print("];")
