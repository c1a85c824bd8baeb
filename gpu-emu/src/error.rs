//! `CUresult` codes and the emulator's error type.

/// The driver's result code (`CUresult`).
pub type CUresult = i32;

pub const CUDA_SUCCESS: CUresult = 0;
pub const CUDA_ERROR_INVALID_VALUE: CUresult = 1;
pub const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
pub const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
pub const CUDA_ERROR_DEINITIALIZED: CUresult = 4;
pub const CUDA_ERROR_NO_DEVICE: CUresult = 100;
pub const CUDA_ERROR_INVALID_DEVICE: CUresult = 101;
pub const CUDA_ERROR_INVALID_IMAGE: CUresult = 200;
pub const CUDA_ERROR_INVALID_CONTEXT: CUresult = 201;
pub const CUDA_ERROR_NO_BINARY_FOR_GPU: CUresult = 209;
pub const CUDA_ERROR_INVALID_PTX: CUresult = 218;
pub const CUDA_ERROR_INVALID_SOURCE: CUresult = 300;
pub const CUDA_ERROR_INVALID_HANDLE: CUresult = 400;
pub const CUDA_ERROR_NOT_FOUND: CUresult = 500;
pub const CUDA_ERROR_NOT_READY: CUresult = 600;
pub const CUDA_ERROR_ILLEGAL_ADDRESS: CUresult = 700;
pub const CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: CUresult = 701;
pub const CUDA_ERROR_LAUNCH_TIMEOUT: CUresult = 702;
pub const CUDA_ERROR_PEER_ACCESS_UNSUPPORTED: CUresult = 217;
pub const CUDA_ERROR_CONTEXT_IS_DESTROYED: CUresult = 709;
pub const CUDA_ERROR_ASSERT: CUresult = 710;
pub const CUDA_ERROR_ILLEGAL_INSTRUCTION: CUresult = 715;
pub const CUDA_ERROR_MISALIGNED_ADDRESS: CUresult = 716;
pub const CUDA_ERROR_LAUNCH_FAILED: CUresult = 719;
pub const CUDA_ERROR_NOT_SUPPORTED: CUresult = 801;
pub const CUDA_ERROR_UNKNOWN: CUresult = 999;

/// `(name, description)` of a code, as `cuGetErrorName` / `cuGetErrorString` give them.
pub fn describe(code: CUresult) -> Option<(&'static str, &'static str)> {
    Some(match code {
        CUDA_SUCCESS => ("CUDA_SUCCESS", "no error"),
        CUDA_ERROR_INVALID_VALUE => ("CUDA_ERROR_INVALID_VALUE", "invalid argument"),
        CUDA_ERROR_OUT_OF_MEMORY => ("CUDA_ERROR_OUT_OF_MEMORY", "out of memory"),
        CUDA_ERROR_NOT_INITIALIZED => ("CUDA_ERROR_NOT_INITIALIZED", "initialization error"),
        CUDA_ERROR_DEINITIALIZED => ("CUDA_ERROR_DEINITIALIZED", "driver shutting down"),
        CUDA_ERROR_NO_DEVICE => ("CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"),
        CUDA_ERROR_INVALID_DEVICE => ("CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"),
        CUDA_ERROR_INVALID_IMAGE => ("CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"),
        CUDA_ERROR_INVALID_CONTEXT => ("CUDA_ERROR_INVALID_CONTEXT", "invalid device context"),
        CUDA_ERROR_NO_BINARY_FOR_GPU => (
            "CUDA_ERROR_NO_BINARY_FOR_GPU",
            "no kernel image is available for execution on the device",
        ),
        CUDA_ERROR_INVALID_PTX => ("CUDA_ERROR_INVALID_PTX", "a PTX JIT compilation failed"),
        CUDA_ERROR_PEER_ACCESS_UNSUPPORTED => (
            "CUDA_ERROR_PEER_ACCESS_UNSUPPORTED",
            "peer access is not supported between these two devices",
        ),
        CUDA_ERROR_INVALID_SOURCE => (
            "CUDA_ERROR_INVALID_SOURCE",
            "device kernel image is invalid",
        ),
        CUDA_ERROR_INVALID_HANDLE => ("CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"),
        CUDA_ERROR_NOT_FOUND => ("CUDA_ERROR_NOT_FOUND", "named symbol not found"),
        CUDA_ERROR_NOT_READY => ("CUDA_ERROR_NOT_READY", "device not ready"),
        CUDA_ERROR_ILLEGAL_ADDRESS => (
            "CUDA_ERROR_ILLEGAL_ADDRESS",
            "an illegal memory access was encountered",
        ),
        CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES => (
            "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES",
            "too many resources requested for launch",
        ),
        CUDA_ERROR_LAUNCH_TIMEOUT => (
            "CUDA_ERROR_LAUNCH_TIMEOUT",
            "the launch timed out and was terminated",
        ),
        CUDA_ERROR_CONTEXT_IS_DESTROYED => {
            ("CUDA_ERROR_CONTEXT_IS_DESTROYED", "context is destroyed")
        }
        CUDA_ERROR_ASSERT => ("CUDA_ERROR_ASSERT", "device-side assert triggered"),
        CUDA_ERROR_ILLEGAL_INSTRUCTION => (
            "CUDA_ERROR_ILLEGAL_INSTRUCTION",
            "an illegal instruction was encountered",
        ),
        CUDA_ERROR_MISALIGNED_ADDRESS => ("CUDA_ERROR_MISALIGNED_ADDRESS", "misaligned address"),
        CUDA_ERROR_LAUNCH_FAILED => ("CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"),
        CUDA_ERROR_NOT_SUPPORTED => ("CUDA_ERROR_NOT_SUPPORTED", "operation not supported"),
        CUDA_ERROR_UNKNOWN => ("CUDA_ERROR_UNKNOWN", "unknown error"),
        _ => return None,
    })
}

/// An emulator error: the driver code it maps to and what happened (printed to stderr with
/// the `rdrop-gpu-emu:` prefix when it is reported).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct EmuError {
    /// The `CUresult` a driver call returns for it.
    pub code: CUresult,
    /// What happened, naming the call, kernel, argument or buffer.
    pub message: String,
}

impl EmuError {
    /// An error with `code` and `message`.
    pub fn new(code: CUresult, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// Prints an emulator report on stderr (one paragraph, prefixed).
pub fn report(msg: &str) {
    use std::io::Write;
    // One write: stderr is unbuffered, and `eprintln!` writes each piece of its format
    // separately, which splits a report around the lines other threads print.
    let line = format!("rdrop-gpu-emu: {msg}\n");
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}
