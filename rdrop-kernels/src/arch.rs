//! Which kernel image a GPU runs: the CUDA kernels ship as fat binaries holding a cubin (SASS)
//! per architecture and the PTX of the lowest, and the driver picks by the GPU's compute
//! capability. [`kernel_image`] is that rule, so that a run can say what it loaded (cubin, or
//! PTX compiled by the driver at start) and refuse a GPU the build cannot run, naming it.

/// The image of a fat binary that runs on a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelImage {
    /// SASS compiled for `sm_N` (no JIT).
    Cubin(u32),
    /// The PTX for `compute_N`, compiled by the driver at load.
    PtxJit(u32),
}

impl std::fmt::Display for KernelImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cubin(a) => write!(f, "cubin sm_{a}"),
            Self::PtxJit(a) => write!(f, "PTX compute_{a}, JIT-compiled by the driver"),
        }
    }
}

/// The image of a fat binary with `cubins` (architectures as `major * 10 + minor`) and PTX
/// for `ptx` that a GPU of compute capability `major.minor` runs, by the driver's rule: the
/// cubin of the same major version with the highest minor not above the GPU's (a cubin never
/// runs on another major version), else the PTX if its architecture is not above the GPU's,
/// else none.
pub fn kernel_image(cubins: &[u32], ptx: u32, major: u32, minor: u32) -> Option<KernelImage> {
    cubins
        .iter()
        .copied()
        .filter(|&a| a / 10 == major && a % 10 <= minor)
        .max()
        .map(KernelImage::Cubin)
        .or_else(|| (ptx <= major * 10 + minor).then_some(KernelImage::PtxJit(ptx)))
}

/// Why a GPU of compute capability `major.minor` has no image in a fat binary with `cubins`
/// and PTX for `ptx`, and how to build one.
pub fn no_image(cubins: &[u32], ptx: u32, major: u32, minor: u32) -> String {
    let covered: Vec<String> = cubins.iter().map(|a| format!("sm_{a}")).collect();
    let hint = if major * 10 + minor < 75 {
        "CUDA 13 no longer compiles for it: build the CUDA 12 flavour \
         (`scripts/build-cuda.sh --cuda 12`)"
            .to_string()
    } else {
        format!("rebuild with RDROP_CUDA_ARCHS={major}{minor} scripts/build-cuda.sh")
    };
    format!(
        "no kernel image for this GPU (compute capability {major}.{minor}): this build holds \
         cubins for {} and PTX for compute_{ptx} (newer GPUs JIT it); {hint}",
        covered.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_driver_picks_the_closest_cubin_of_the_same_major_else_the_ptx() {
        let cuda13 = [75, 80, 86, 89, 90];
        let pick = |cc: (u32, u32)| kernel_image(&cuda13, 75, cc.0, cc.1);
        assert_eq!(pick((7, 5)), Some(KernelImage::Cubin(75))); // T4
        assert_eq!(pick((8, 0)), Some(KernelImage::Cubin(80))); // A100
        assert_eq!(pick((8, 6)), Some(KernelImage::Cubin(86))); // RTX 3090
        assert_eq!(pick((8, 7)), Some(KernelImage::Cubin(86))); // Orin
        assert_eq!(pick((8, 9)), Some(KernelImage::Cubin(89))); // RTX 4090, L4
        assert_eq!(pick((9, 0)), Some(KernelImage::Cubin(90))); // H100, H200
        assert_eq!(pick((10, 0)), Some(KernelImage::PtxJit(75))); // B200
        assert_eq!(pick((12, 0)), Some(KernelImage::PtxJit(75))); // RTX 5090
        assert_eq!(pick((7, 0)), None); // V100: CUDA 13 cannot build for it
        let cuda12 = [70, 75, 80, 86, 89, 90];
        assert_eq!(
            kernel_image(&cuda12, 70, 7, 0),
            Some(KernelImage::Cubin(70))
        );
        assert_eq!(kernel_image(&[90], 90, 8, 0), None);
        assert_eq!(
            KernelImage::PtxJit(75).to_string(),
            "PTX compute_75, JIT-compiled by the driver"
        );
    }

    #[test]
    fn a_gpu_without_an_image_is_told_how_to_build_one() {
        let v100 = no_image(&[75, 80, 86, 89, 90], 75, 7, 0);
        assert!(
            v100.starts_with("no kernel image for this GPU (compute capability 7.0)"),
            "{v100}"
        );
        assert!(
            v100.contains("sm_75, sm_80, sm_86, sm_89, sm_90 and PTX for compute_75"),
            "{v100}"
        );
        assert!(v100.contains("--cuda 12"), "{v100}");
        let narrow = no_image(&[90], 90, 8, 6);
        assert!(
            narrow.ends_with("rebuild with RDROP_CUDA_ARCHS=86 scripts/build-cuda.sh"),
            "{narrow}"
        );
    }
}
