//! Build script of rdrop-gpu-emu: the host-compiled kernel modules (`build/kernels.rs`) and
//! the shell libraries with the real sonames (`build/shells.rs`), into `OUT_DIR`.
#[path = "build/kernels.rs"]
mod kernels;
#[path = "build/shells.rs"]
mod shells;

fn main() {
    kernels::build();
    shells::build();
}
