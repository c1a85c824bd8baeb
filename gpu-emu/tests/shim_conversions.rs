//! The shim's bf16/f16 conversions (`shim/cuda_bf16.h`, `shim/cuda_fp16.h`, the ones the
//! host-compiled kernels use) against the `half` crate (round to nearest even), through
//! `OUT_DIR/kernels/shim_selftest.so` (`shim/tests/shim_selftest.cpp`). NaN follows CUDA's
//! rule, not `half`'s: f32 → bf16/f16 gives the canonical NaN 0x7fff for every NaN, f16 → f32
//! the canonical 0x7fffffff (CUDA's `__internal_half2float`), bf16 → f32 keeps the bits.
#![allow(unsafe_code)]

use std::ffi::{c_void, CString};

use half::{bf16, f16};

struct Conv {
    f2bf: extern "C" fn(f32) -> u16,
    bf2f: extern "C" fn(u16) -> f32,
    f2h: extern "C" fn(f32) -> u16,
    h2f: extern "C" fn(u16) -> f32,
}

fn sym(h: *mut c_void, name: &str) -> *mut c_void {
    let c = CString::new(name).unwrap();
    // SAFETY: `h` is a live handle from dlopen, `c` a NUL-terminated name.
    let p = unsafe { libc::dlsym(h, c.as_ptr()) };
    assert!(!p.is_null(), "{name} not exported by shim_selftest.so");
    p
}

fn load() -> Conv {
    let path = format!("{}/shim_selftest.so", env!("RDEMU_KERNELS_DIR"));
    let c = CString::new(path.clone()).unwrap();
    // SAFETY: dlopen of a library built by this crate's build script (no initialisers).
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null(), "dlopen {path} failed");
    // SAFETY: the symbols are the extern "C" functions of shim_selftest.cpp with these types.
    unsafe {
        Conv {
            f2bf: std::mem::transmute::<*mut c_void, extern "C" fn(f32) -> u16>(sym(
                h,
                "rdemu_f2bf",
            )),
            bf2f: std::mem::transmute::<*mut c_void, extern "C" fn(u16) -> f32>(sym(
                h,
                "rdemu_bf2f",
            )),
            f2h: std::mem::transmute::<*mut c_void, extern "C" fn(f32) -> u16>(sym(h, "rdemu_f2h")),
            h2f: std::mem::transmute::<*mut c_void, extern "C" fn(u16) -> f32>(sym(h, "rdemu_h2f")),
        }
    }
}

/// f32 bit patterns: every upper half with lower halves around the rounding points of bf16
/// (bit 15) and f16 (bits 12/13), plus pseudo-random patterns.
fn patterns() -> Vec<u32> {
    let lows: [u32; 16] = [
        0, 1, 0x0fff, 0x1000, 0x1001, 0x2000, 0x3000, 0x5000, 0x7fff, 0x8000, 0x8001, 0x9000,
        0xbfff, 0xe000, 0xf000, 0xffff,
    ];
    let mut v = Vec::with_capacity(65536 * lows.len() + (1 << 20));
    for hi in 0u32..65536 {
        for &lo in &lows {
            v.push(hi << 16 | lo);
        }
    }
    let mut s = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..(1 << 20) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.push((s >> 16) as u32);
    }
    v
}

#[test]
fn f32_to_bf16_rounds_to_nearest_even() {
    let c = load();
    for bits in patterns() {
        let f = f32::from_bits(bits);
        let got = (c.f2bf)(f);
        let want = if f.is_nan() {
            0x7fff
        } else {
            bf16::from_f32(f).to_bits()
        };
        assert_eq!(
            got, want,
            "f32 {bits:#010x} ({f:e}) → bf16: {got:#06x}, want {want:#06x}"
        );
    }
    // ties: to even
    assert_eq!((c.f2bf)(f32::from_bits(0x3f80_8000)), 0x3f80);
    assert_eq!((c.f2bf)(f32::from_bits(0x3f81_8000)), 0x3f82);
    // overflow: to ±inf; the largest finite bf16 stays
    assert_eq!((c.f2bf)(f32::MAX), 0x7f80);
    assert_eq!((c.f2bf)(-f32::MAX), 0xff80);
    assert_eq!((c.f2bf)(f32::from_bits(0x7f7f_7fff)), 0x7f7f);
    assert_eq!((c.f2bf)(f32::INFINITY), 0x7f80);
    assert_eq!((c.f2bf)(f32::NEG_INFINITY), 0xff80);
    assert_eq!((c.f2bf)(-f32::NAN), 0x7fff);
    assert_eq!((c.f2bf)(f32::from_bits(0xff80_0001)), 0x7fff);
    assert_eq!((c.f2bf)(-0.0), 0x8000);
}

#[test]
fn bf16_to_f32_is_exact() {
    let c = load();
    for b in 0u16..=u16::MAX {
        let got = (c.bf2f)(b).to_bits();
        assert_eq!(got, (b as u32) << 16, "bf16 {b:#06x} → f32 {got:#010x}");
        let h = bf16::from_bits(b);
        if !h.is_nan() {
            assert_eq!(got, h.to_f32().to_bits());
        }
    }
}

#[test]
fn f32_to_f16_rounds_to_nearest_even() {
    let c = load();
    for bits in patterns() {
        let f = f32::from_bits(bits);
        let got = (c.f2h)(f);
        let want = if f.is_nan() {
            0x7fff
        } else {
            f16::from_f32(f).to_bits()
        };
        assert_eq!(
            got, want,
            "f32 {bits:#010x} ({f:e}) → f16: {got:#06x}, want {want:#06x}"
        );
    }
    // the largest finite f16, the tie above it (to even: inf), just below the tie
    assert_eq!((c.f2h)(65504.0), 0x7bff);
    assert_eq!((c.f2h)(65520.0), 0x7c00);
    assert_eq!((c.f2h)(f32::from_bits(0x477f_efff)), 0x7bff);
    assert_eq!((c.f2h)(-1e10), 0xfc00);
    // subnormals: 2^-24 is the smallest, 2^-25 a tie to 0, just above it rounds up
    assert_eq!((c.f2h)(2f32.powi(-24)), 0x0001);
    assert_eq!((c.f2h)(2f32.powi(-25)), 0x0000);
    assert_eq!(
        (c.f2h)(f32::from_bits(2f32.powi(-25).to_bits() + 1)),
        0x0001
    );
    assert_eq!((c.f2h)(-(2f32.powi(-25))), 0x8000);
    assert_eq!((c.f2h)(3.0 * 2f32.powi(-25)), 0x0002); // 1.5 ulp: tie to even (2)
    assert_eq!((c.f2h)(5.0 * 2f32.powi(-25)), 0x0002); // 2.5 ulp: tie to even (2)
                                                       // the largest subnormal rounding up into the smallest normal
    assert_eq!((c.f2h)(f32::from_bits(0x387f_f000)), 0x0400);
    assert_eq!((c.f2h)(2f32.powi(-14)), 0x0400);
    assert_eq!((c.f2h)(f32::NAN), 0x7fff);
    assert_eq!((c.f2h)(-f32::NAN), 0x7fff);
    assert_eq!((c.f2h)(f32::INFINITY), 0x7c00);
}

#[test]
fn f16_to_f32_is_exact() {
    let c = load();
    for h in 0u16..=u16::MAX {
        let got = (c.h2f)(h).to_bits();
        let x = f16::from_bits(h);
        if x.is_nan() {
            assert_eq!(
                got, 0x7fff_ffff,
                "f16 NaN {h:#06x} → f32 {got:#010x}, want CUDA's canonical NaN"
            );
        } else {
            assert_eq!(got, x.to_f32().to_bits(), "f16 {h:#06x} → f32 {got:#010x}");
            // and back
            assert_eq!((c.f2h)(f32::from_bits(got)), h);
        }
    }
    assert_eq!((c.h2f)(0x0001), 2f32.powi(-24));
    assert_eq!((c.h2f)(0x03ff), 1023.0 * 2f32.powi(-24));
    assert_eq!((c.h2f)(0x8000).to_bits(), 0x8000_0000);
}
