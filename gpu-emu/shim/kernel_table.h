// The kernel table of a host-compiled module: included by the generated
// `OUT_DIR/kernels/gen_<module>.cpp` after the `.cu` file, which then lists every
// `extern "C" __global__` kernel with `RDEMU_KERNEL_ENTRY` (the parameter declarations come
// from the build script's scan, the sizes and the count from the compiler) and ends with
// `RDEMU_MODULE(source)`.
//
// `pack`/`run` are not instrumented: their reads of `kernel_params` and of the packed block are
// the driver's, not the kernel's. They use nothing but builtins (an out-of-line helper would be
// instrumented code again); the kernel they call is instrumented.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <tuple>
#include <type_traits>
#include <utility>

#include "rdemu_api.h"

#define RDEMU_NOSAN __attribute__((no_sanitize_address))

namespace rdemu_table {

constexpr size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

/// Layout of the packed argument block of a kernel `void(A...)`: each value at its alignment.
template <class... A>
struct Layout {
    static constexpr size_t n = sizeof...(A);
    static constexpr size_t size[n + 1] = {sizeof(std::decay_t<A>)..., 0};
    static constexpr size_t align[n + 1] = {alignof(std::decay_t<A>)..., 1};
    struct Offsets {
        size_t off[n + 1];
        size_t total;
    };
    static constexpr Offsets offsets() {
        Offsets o{};
        size_t at = 0;
        for (size_t i = 0; i < n; ++i) {
            at = align_up(at, align[i]);
            o.off[i] = at;
            at += size[i];
        }
        o.off[n] = at;
        o.total = at == 0 ? 1 : at;
        return o;
    }
    static constexpr Offsets layout = offsets();
};

template <class T>
__attribute__((always_inline)) RDEMU_NOSAN inline T load(const unsigned char* p) {
    T v;
    __builtin_memcpy(&v, p, sizeof(T));
    return v;
}

template <class F, F K>
struct Kernel;

template <class... A, void (*K)(A...)>
struct Kernel<void (*)(A...), K> {
    using L = Layout<A...>;
    static constexpr uint32_t nparams = (uint32_t)sizeof...(A);
    static_assert((std::is_trivially_copyable<std::decay_t<A>>::value && ...),
                  "rdrop-gpu-emu: kernel parameters must be trivially copyable");

    template <size_t I>
    using arg = std::decay_t<std::tuple_element_t<I, std::tuple<A...>>>;

    template <size_t... I>
    __attribute__((always_inline)) RDEMU_NOSAN static inline void copy_in(unsigned char* b, void* const* p,
                                                                        std::index_sequence<I...>) {
        (__builtin_memcpy(b + L::layout.off[I], p[I], L::size[I]), ...);
    }
    RDEMU_NOSAN static void* pack(void* const* params) {
        unsigned char* b = (unsigned char*)malloc(L::layout.total);
        if (!b) return nullptr;
        copy_in(b, params, std::index_sequence_for<A...>{});
        return b;
    }
    RDEMU_NOSAN static void pack_free(void* packed) { free(packed); }

    template <size_t... I>
    __attribute__((always_inline)) RDEMU_NOSAN static inline void call(const unsigned char* b,
                                                                     std::index_sequence<I...>) {
        K(load<std::decay_t<A>>(b + L::layout.off[I])...);
    }
    RDEMU_NOSAN static void run(const void* packed) {
        call((const unsigned char*)packed, std::index_sequence_for<A...>{});
    }

    template <size_t I>
    static constexpr rdemu_param param(const char* decl) {
        using T = std::decay_t<std::tuple_element_t<I, std::tuple<A..., void*>>>;
        return rdemu_param{decl, (uint32_t)sizeof(T), (uint32_t)std::is_pointer<T>::value};
    }
};

}  // namespace rdemu_table

/// The `rdemu_kernel` of kernel NAME (its parameter table `rdemu_params_NAME` defined before).
#define RDEMU_KERNEL_TYPE(NAME) ::rdemu_table::Kernel<decltype(&NAME), &NAME>
#define RDEMU_KERNEL_ENTRY(NAME, PARAMS)                                                                       \
    {#NAME, RDEMU_KERNEL_TYPE(NAME)::nparams, PARAMS, &RDEMU_KERNEL_TYPE(NAME)::pack,                         \
     &RDEMU_KERNEL_TYPE(NAME)::pack_free, &RDEMU_KERNEL_TYPE(NAME)::run}
/// Asserts at compile time that the scan found as many parameters as the compiler sees.
#define RDEMU_CHECK_COUNT(NAME, N)                                                                             \
    static_assert(RDEMU_KERNEL_TYPE(NAME)::nparams == (N),                                                     \
                  "rdrop-gpu-emu: kernel " #NAME ": the scan of its declaration found " #N                   \
                  " parameters, the compiler a different count")
#define RDEMU_PARAM(NAME, I, DECL) RDEMU_KERNEL_TYPE(NAME)::param<I>(DECL)

/// The module's table and its `rdemu_module_init` (NULL for an api of another ABI version).
#define RDEMU_MODULE(SOURCE, KERNELS)                                                                         \
    static const rdemu_module rdemu_the_module = {RDEMU_ABI_VERSION, SOURCE, __CUDA_ARCH__,                    \
                                                  (uint32_t)(sizeof(KERNELS) / sizeof(KERNELS[0])), KERNELS,    \
                                                  &rdemu_rt_shared_range};                                     \
    extern "C" __attribute__((visibility("default"))) RDEMU_NOSAN const rdemu_module* rdemu_module_init(       \
        const rdemu_api* api) {                                                                                \
        if (!api || api->version != RDEMU_ABI_VERSION) return nullptr;                                         \
        rdemu_rt_set_api(api);                                                                                 \
        return &rdemu_the_module;                                                                              \
    }
