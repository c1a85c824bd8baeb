// The C ABI between the emulated driver (rdrop-gpu-emu, Rust) and a host-compiled kernel
// module (one rdrop-kernels `.cu` file built by g++ with cuda_shim.h). The module calls back
// into the driver through `rdemu_api` (thread indices, barriers, shuffles, memory checks);
// the driver finds the module's kernels through `rdemu_module_init`.
#pragma once
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RDEMU_ABI_VERSION 1

typedef struct rdemu_dim3 {
    unsigned x, y, z;
} rdemu_dim3;

/// Shuffle kinds of `rdemu_api.shfl`.
enum { RDEMU_SHFL_IDX = 0, RDEMU_SHFL_UP = 1, RDEMU_SHFL_DOWN = 2, RDEMU_SHFL_XOR = 3 };

/// Vote kinds of `rdemu_api.vote`.
enum { RDEMU_VOTE_BALLOT = 0, RDEMU_VOTE_ANY = 1, RDEMU_VOTE_ALL = 2 };

/// Services of the driver to the kernels, valid while a kernel thread runs.
typedef struct rdemu_api {
    uint32_t version;
    rdemu_dim3 (*thread_idx)(void);
    rdemu_dim3 (*block_idx)(void);
    rdemu_dim3 (*block_dim)(void);
    rdemu_dim3 (*grid_dim)(void);
    /// `__syncthreads()`.
    void (*syncthreads)(void);
    /// `__syncwarp(mask)`.
    void (*syncwarp)(unsigned mask);
    /// `__shfl*_sync(mask, value, lane_or_delta, width)`: `value` holds `size` (4 or 8) bytes.
    uint64_t (*shfl)(int kind, unsigned mask, uint64_t value, int size, int lane_or_delta, int width);
    /// `__ballot_sync` / `__any_sync` / `__all_sync`.
    unsigned (*vote)(int kind, unsigned mask, int pred);
    /// A load (`is_write` 0) or store (1) of `size` bytes at `addr` by the running kernel
    /// thread: the driver checks it (memcheck, shared-memory races) before it happens.
    void (*check)(const void* addr, size_t size, int is_write);
    /// A feature the shim does not emulate, or `__trap()`: fails the launch naming `what`.
    void (*unsupported)(const char* what);
    /// `__threadfence*()`: a no-op on the host, kept to count it.
    void (*threadfence)(void);
} rdemu_api;

/// One kernel parameter as written in the source (`decl`, e.g. "const float* img").
typedef struct rdemu_param {
    const char* decl;
    uint32_t size;
    uint32_t is_pointer;
} rdemu_param;

/// One `extern "C" __global__` kernel of the module.
typedef struct rdemu_kernel {
    const char* name;
    uint32_t nparams;
    const rdemu_param* params;
    /// Copies the launch's arguments (`kernelParams` of cuLaunchKernel: one pointer per
    /// parameter) into a block of their values; freed by `unpack_free`.
    void* (*pack)(void* const* kernel_params);
    void (*pack_free)(void* packed);
    /// Runs one thread of the kernel with the packed arguments (indices from `rdemu_api`).
    void (*run)(const void* packed);
} rdemu_kernel;

typedef struct rdemu_module {
    uint32_t version;
    /// The `.cu` file the module was compiled from.
    const char* source;
    /// `__CUDA_ARCH__` it was compiled with (e.g. 900).
    uint32_t arch;
    uint32_t nkernels;
    const rdemu_kernel* kernels;
    /// Touches the module's thread-local storage (its `__shared__` variables) on the calling
    /// thread and returns its first byte and its size, so that the driver knows which
    /// addresses are this thread's shared memory.
    void (*shared_range)(void** start, size_t* bytes);
} rdemu_module;

/// Exported by every kernel module.
const rdemu_module* rdemu_module_init(const rdemu_api* api);

#ifdef __cplusplus
}
#endif
