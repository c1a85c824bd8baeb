//! Fuzz the `.tar.gz` reader (gzip, tar, then the pickle decoder for each member).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = rdrop_data::Cifar::from_tar_gz_reader(data, "fuzz-input.tar.gz");
});
