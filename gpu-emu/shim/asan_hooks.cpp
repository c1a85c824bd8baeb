// The runtime half of a host-compiled kernel module, linked into every module `.so` and
// compiled WITHOUT instrumentation (its own memory accesses are not kernel accesses):
//
// - the hooks that GCC's -fsanitize=kernel-address (with
//   --param asan-instrumentation-with-call-threshold=0) calls before every load and store of
//   kernel code, forwarded to `rdemu_api.check(addr, size, is_write)`;
// - the `rdemu_rt_*` services that cuda_shim.h's built-ins (threadIdx, __syncthreads,
//   __shfl_sync, ...) call, forwarded to the driver's `rdemu_api`;
// - `rdemu_rt_shared_range`: the module's thread-local storage (its `__shared__` variables)
//   on the calling thread.
//
// Everything here is hidden (-fvisibility=hidden): calls bind inside the module, so that two
// modules (or a process with a real ASan runtime) never share hooks or api pointers.
#include <dlfcn.h>
#include <link.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "rdemu_api.h"

#define RDEMU_HIDDEN __attribute__((visibility("hidden")))

namespace {
const rdemu_api* g_api = nullptr;
// Touched before the module's TLS block is looked up, so that the block exists on this thread
// (glibc allocates a dlopen'ed module's TLS lazily) and is never empty.
thread_local volatile char g_tls_marker;
}  // namespace

extern "C" {

RDEMU_HIDDEN void rdemu_rt_set_api(const rdemu_api* api) { g_api = api; }

// ---------------------------------------------------------------------------- memory hooks
// The driver runs every kernel thread on a fiber whose stack is exactly one aligned slot of
// RDEMU_STACK_SLOT bytes (src/fiber.rs): an access in the same slot as this hook's own frame is
// the thread's own stack (locals, spilled arguments), fine without asking the driver. Most
// checked accesses of some kernels are such locals (e.g. a polynomial's coefficient table).
#define RDEMU_STACK_SLOT_SHIFT 18
static inline void rdemu_check(uintptr_t addr, size_t size, int is_write) {
    uintptr_t sp = (uintptr_t)__builtin_frame_address(0);
    if (((addr ^ sp) >> RDEMU_STACK_SLOT_SHIFT) == 0 && size > 0 &&
        (((addr + size - 1) ^ sp) >> RDEMU_STACK_SLOT_SHIFT) == 0)
        return;
    const rdemu_api* api = g_api;
    if (api) api->check((const void*)addr, size, is_write);
}

#define RDEMU_HOOKS(N)                                                                     \
    RDEMU_HIDDEN void __asan_load##N##_noabort(uintptr_t a) { rdemu_check(a, N, 0); }       \
    RDEMU_HIDDEN void __asan_store##N##_noabort(uintptr_t a) { rdemu_check(a, N, 1); }      \
    RDEMU_HIDDEN void __asan_load##N(uintptr_t a) { rdemu_check(a, N, 0); }                 \
    RDEMU_HIDDEN void __asan_store##N(uintptr_t a) { rdemu_check(a, N, 1); }                \
    RDEMU_HIDDEN void __asan_report_load##N##_noabort(uintptr_t a) { rdemu_check(a, N, 0); } \
    RDEMU_HIDDEN void __asan_report_store##N##_noabort(uintptr_t a) { rdemu_check(a, N, 1); } \
    RDEMU_HIDDEN void __asan_report_load##N(uintptr_t a) { rdemu_check(a, N, 0); }          \
    RDEMU_HIDDEN void __asan_report_store##N(uintptr_t a) { rdemu_check(a, N, 1); }
RDEMU_HOOKS(1)
RDEMU_HOOKS(2)
RDEMU_HOOKS(4)
RDEMU_HOOKS(8)
RDEMU_HOOKS(16)
#undef RDEMU_HOOKS

RDEMU_HIDDEN void __asan_loadN_noabort(uintptr_t a, size_t n) { rdemu_check(a, n, 0); }
RDEMU_HIDDEN void __asan_storeN_noabort(uintptr_t a, size_t n) { rdemu_check(a, n, 1); }
RDEMU_HIDDEN void __asan_loadN(uintptr_t a, size_t n) { rdemu_check(a, n, 0); }
RDEMU_HIDDEN void __asan_storeN(uintptr_t a, size_t n) { rdemu_check(a, n, 1); }
RDEMU_HIDDEN void __asan_report_load_n_noabort(uintptr_t a, size_t n) { rdemu_check(a, n, 0); }
RDEMU_HIDDEN void __asan_report_store_n_noabort(uintptr_t a, size_t n) { rdemu_check(a, n, 1); }
RDEMU_HIDDEN void __asan_report_load_n(uintptr_t a, size_t n) { rdemu_check(a, n, 0); }
RDEMU_HIDDEN void __asan_report_store_n(uintptr_t a, size_t n) { rdemu_check(a, n, 1); }
// Emitted by some GCC configurations before a noreturn call; nothing to do here.
RDEMU_HIDDEN void __asan_handle_no_return(void) {}

// -------------------------------------------------------------------------------- services
static inline rdemu_dim3 rdemu_zero3() { return rdemu_dim3{0, 0, 0}; }

RDEMU_HIDDEN rdemu_dim3 rdemu_rt_thread_idx(void) { return g_api ? g_api->thread_idx() : rdemu_zero3(); }
RDEMU_HIDDEN rdemu_dim3 rdemu_rt_block_idx(void) { return g_api ? g_api->block_idx() : rdemu_zero3(); }
RDEMU_HIDDEN rdemu_dim3 rdemu_rt_block_dim(void) { return g_api ? g_api->block_dim() : rdemu_dim3{1, 1, 1}; }
RDEMU_HIDDEN rdemu_dim3 rdemu_rt_grid_dim(void) { return g_api ? g_api->grid_dim() : rdemu_dim3{1, 1, 1}; }
RDEMU_HIDDEN void rdemu_rt_syncthreads(void) {
    if (g_api) g_api->syncthreads();
}
RDEMU_HIDDEN void rdemu_rt_syncwarp(unsigned mask) {
    if (g_api) g_api->syncwarp(mask);
}
RDEMU_HIDDEN uint64_t rdemu_rt_shfl(int kind, unsigned mask, uint64_t value, int size, int lane_or_delta,
                                    int width) {
    return g_api ? g_api->shfl(kind, mask, value, size, lane_or_delta, width) : value;
}
RDEMU_HIDDEN unsigned rdemu_rt_vote(int kind, unsigned mask, int pred) {
    return g_api ? g_api->vote(kind, mask, pred) : 0u;
}
RDEMU_HIDDEN void rdemu_rt_unsupported(const char* what) {
    if (g_api) g_api->unsupported(what);
}
RDEMU_HIDDEN void rdemu_rt_threadfence(void) {
    if (g_api) g_api->threadfence();
}

// ------------------------------------------------------------------------- shared memory
namespace {
struct TlsSizeQuery {
    const char* name;
    ElfW(Addr) addr;
    size_t size;
    int found;
};

int tls_size_of(struct dl_phdr_info* info, size_t, void* data) {
    TlsSizeQuery* q = static_cast<TlsSizeQuery*>(data);
    if (info->dlpi_addr != q->addr) return 0;
    if (q->name && info->dlpi_name && strcmp(info->dlpi_name, q->name) != 0) return 0;
    for (ElfW(Half) i = 0; i < info->dlpi_phnum; ++i) {
        if (info->dlpi_phdr[i].p_type == PT_TLS) {
            q->size = (size_t)info->dlpi_phdr[i].p_memsz;
            q->found = 1;
            return 1;
        }
    }
    return 0;
}

// The module's PT_TLS size, found once (the same on every thread).
size_t g_tls_size = 0;
int g_tls_size_known = 0;
}  // namespace

RDEMU_HIDDEN void rdemu_rt_shared_range(void** start, size_t* bytes) {
    *start = nullptr;
    *bytes = 0;
    (void)g_tls_marker;  // allocates this thread's block of the module
    Dl_info info;
    if (!dladdr((const void*)&rdemu_rt_shared_range, &info) || !info.dli_fname) return;
    void* h = dlopen(info.dli_fname, RTLD_NOLOAD | RTLD_LAZY);
    if (!h) return;
    void* tls = nullptr;
    if (dlinfo(h, RTLD_DI_TLS_DATA, &tls) != 0) tls = nullptr;
    if (!__atomic_load_n(&g_tls_size_known, __ATOMIC_ACQUIRE)) {
        struct link_map* lm = nullptr;
        if (dlinfo(h, RTLD_DI_LINKMAP, &lm) == 0 && lm) {
            TlsSizeQuery q{lm->l_name, lm->l_addr, 0, 0};
            dl_iterate_phdr(tls_size_of, &q);
            if (q.found) {
                __atomic_store_n(&g_tls_size, q.size, __ATOMIC_RELAXED);
                __atomic_store_n(&g_tls_size_known, 1, __ATOMIC_RELEASE);
            }
        }
    }
    dlclose(h);
    if (!tls || !__atomic_load_n(&g_tls_size_known, __ATOMIC_ACQUIRE)) return;
    *start = tls;
    *bytes = __atomic_load_n(&g_tls_size, __ATOMIC_RELAXED);
}

}  // extern "C"
