//! The kernels the CUDA launchers name are exactly the entries of the embedded PTX, each in one
//! module (feature `cuda`; no GPU needed: it reads the launchers' sources and build.rs's module
//! table). A renamed, missing or never launched kernel fails here, before any GPU run.
//! `scripts/build-cuda.sh --check` runs it.
#![cfg(feature = "cuda")]

use std::collections::BTreeSet;

// `MODULES`: each `.cu` as (name, PTX, fat binary), as build.rs found them.
include!(concat!(env!("OUT_DIR"), "/modules.rs"));

/// The kernels the launchers name: `typed::<T>(…)` (each compute type), `plain(…)` and
/// `permute::<T>(…)`, with a literal or the launcher's `const K`.
fn launched() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src/cuda");
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "rs") {
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        for (call, typed) in [
            ("typed::<T>(", true),
            ("permute::<T>(", true),
            ("plain(", false),
        ] {
            for (at, _) in src.match_indices(&format!(".{call}")) {
                let arg = &src[at + call.len() + 1..];
                let arg = &arg[..arg.find([')', ',']).unwrap()];
                let kernel = match arg.strip_prefix('"') {
                    Some(lit) => lit.trim_end_matches('"'),
                    None if arg == "K" => {
                        let def = src[..at].rfind("const K: &str = \"").unwrap();
                        let lit = &src[def + 17..];
                        &lit[..lit.find('"').unwrap()]
                    }
                    None => continue, // a helper's parameter: its callers are scanned
                };
                if typed {
                    names.extend(["f32", "bf16", "f16"].map(|t| format!("{kernel}_{t}")));
                } else {
                    names.insert(kernel.to_string());
                }
            }
        }
    }
    names
}

#[test]
fn the_launchers_launch_every_kernel_of_the_modules() {
    let mut entries = BTreeSet::new();
    for (module, ptx, fatbin) in MODULES {
        assert!(fatbin.len() > 1000, "{module}.fatbin is empty");
        for line in ptx.lines() {
            if let Some(rest) = line.split(".entry ").nth(1) {
                let name = rest.trim_end_matches('(').to_string();
                assert!(entries.insert(name.clone()), "{name} in two modules");
            }
        }
    }
    assert_eq!(launched(), entries);
    assert!(entries.len() > 70, "{} kernels", entries.len());
}
