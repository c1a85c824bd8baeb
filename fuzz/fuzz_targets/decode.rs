//! Fuzz the CIFAR pickle decoder: any bytes must give Ok or a typed error, never a panic,
//! a hang or a stack overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = rdrop_data::cifar::decode_file(data, "fuzz-input");
});
