//! Launcher of `cast.cu`.

use super::{Compute, CudaKernels, DevicePtr, DevicePtrMut, Result};

impl CudaKernels {
    /// `out = cast_T(x)` (round to nearest even). Grid: one thread per element.
    pub fn cast_from_f32<T: Compute>(
        &self,
        out: &mut impl DevicePtrMut<T>,
        x: &impl DevicePtr<f32>,
    ) -> Result<()> {
        let n = out.len();
        self.typed::<T>("cast_f32_to")
            .output("out", out, n)
            .input("x", x, n)
            .ints([("elements", n)])
            .launch(n)
    }
}
