// Just enough of CUDA to run poet_ops.cu on the CPU: each block runs as blockDim.x std::threads that meet at
// a std::barrier for __syncthreads(); blocks run one after another. Shared memory starts as NaN bytes, so a
// kernel that reads shared memory it never wrote produces NaN. Each thread flushes subnormals to zero, as CuPy's
// -ftz=true makes the GPU do for float (the CPU's flag flushes double too; no test depends on double subnormals).
#pragma once
#include <atomic>
#include <barrier>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#endif

#define POET_EMULATED 1
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)

struct dim3 {
    unsigned int x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;
inline unsigned char* poet_shared = nullptr;
inline std::barrier<>* block_barrier = nullptr;

inline void __syncthreads() { block_barrier->arrive_and_wait(); }

// Subnormal inputs read as zero and subnormal results are written as zero in this thread (-ftz=true).
inline void flush_subnormals_to_zero() {
#if defined(__x86_64__) || defined(__i386__)
    _mm_setcsr(_mm_getcsr() | 0x8040);  // MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6)
#elif defined(__aarch64__)
    std::uint64_t control;
    __asm__ volatile("mrs %0, fpcr" : "=r"(control));
    __asm__ volatile("msr fpcr, %0" : : "r"(control | (1ull << 24)));  // FPCR.FZ
#else
#error "the kernel emulator needs x86 or AArch64 to model -ftz=true"
#endif
}

template <typename T>
inline T atomicAdd(T* address, T value) {
    return std::atomic_ref<T>(*address).fetch_add(value);
}

// Runs kernel(args...) on grid×block threads with `shared_bytes` of dynamic shared memory.
template <typename... Params, typename... Args>
void emulate_launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared_bytes, Args... args) {
    gridDim = grid;
    blockDim = block;
    std::vector<unsigned char> shared(shared_bytes + 16);
    for (unsigned int bz = 0; bz < grid.z; ++bz)
        for (unsigned int by = 0; by < grid.y; ++by)
            for (unsigned int bx = 0; bx < grid.x; ++bx) {
                std::memset(shared.data(), 0xff, shared.size());  // all-ones bytes are a NaN in every float type
                poet_shared = shared.data();
                std::barrier<> barrier(block.x * block.y * block.z);
                block_barrier = &barrier;
                std::vector<std::thread> threads;
                for (unsigned int tz = 0; tz < block.z; ++tz)
                    for (unsigned int ty = 0; ty < block.y; ++ty)
                        for (unsigned int tx = 0; tx < block.x; ++tx)
                            threads.emplace_back([&, bx, by, bz, tx, ty, tz] {
                                blockIdx = {bx, by, bz};
                                threadIdx = {tx, ty, tz};
                                flush_subnormals_to_zero();
                                kernel(args...);
                                barrier.arrive_and_drop();  // as on a GPU, finished threads stop counting
                            });
                for (std::thread& thread : threads) thread.join();
            }
}

// Kernel arguments arrive as an array of machine words: pointers, or integers (all long long).
template <typename T>
T from_word(void* word) {
    if constexpr (std::is_pointer_v<T>)
        return static_cast<T>(word);
    else
        return static_cast<T>(reinterpret_cast<std::intptr_t>(word));
}

template <typename... Params, std::size_t... I>
void launch_from_words(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared, void** words,
                       std::index_sequence<I...>) {
    emulate_launch(kernel, grid, block, shared, from_word<Params>(words[I])...);
}

template <typename... Params>
void launch_from_words(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t shared, void** words) {
    launch_from_words(kernel, grid, block, shared, words, std::index_sequence_for<Params...>{});
}
