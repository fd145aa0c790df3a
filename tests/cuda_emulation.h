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

// A software model of mma.sync.aligned.m16n8k8.row.col.f32.{tf32,bf16,f16}: d += A·B for one warp, each thread
// holding its fragments in the PTX ISA's layout (see poet_ops.cu). kind 0 is TF32 (a[0..3], b[0..1], one element
// each, only the TF32 bits used), 1 bf16 and 2 fp16 (a[0..1], b[0], two elements each, lower index low). The
// threads of a warp exchange fragments through memory between two block barriers, so every thread of the block
// must reach each call, as the kernels guarantee. Products are summed in float in k order.
struct EmulatedFragments {
    unsigned int a[4], b[2];
};
inline EmulatedFragments emulated_fragments[1024];

inline float emulated_element(int kind, const unsigned int* words, int index) {
    unsigned int bits;
    if (kind == 0) {
        bits = words[index] & 0xffffe000u;
    } else {
        unsigned int half = (words[index / 2] >> (16 * (index % 2))) & 0xffffu;
        if (kind == 1) {
            bits = half << 16;
        } else {  // IEEE half to float
            unsigned int sign = (half & 0x8000u) << 16, exponent = (half >> 10) & 0x1fu, mantissa = half & 0x3ffu;
            if (exponent == 0) {
                float magnitude = (float)mantissa * 5.9604644775390625e-8f;
                return sign ? -magnitude : magnitude;
            }
            bits = sign | (exponent == 31 ? 0x7f800000u | (mantissa << 13) : ((exponent + 112) << 23) | (mantissa << 13));
        }
    }
    float value;
    std::memcpy(&value, &bits, 4);
    return value;
}

inline void emulated_warp_mma(int kind, float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2]) {
    unsigned int self = threadIdx.x, warp = self / 32 * 32, g = self % 32 / 4, t = self % 4;
    emulated_fragments[self] = {{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
    __syncthreads();
    for (int i = 0; i < 4; ++i) {
        unsigned int row = g + 8 * (i / 2), col = 2 * t + i % 2;
        float sum = d[i];
        for (unsigned int k = 0; k < 8; ++k) {
            // Where A[row][k] and B[k][col] live: which lane of the warp, which element of its fragment.
            unsigned int a_lane = row % 8 * 4 + (kind == 0 ? k % 4 : k / 2);
            int a_index = kind == 0 ? row / 8 + 2 * (k / 4) : k % 2 + 2 * (row / 8);
            unsigned int b_lane = col * 4 + (kind == 0 ? k % 4 : k / 2);
            int b_index = kind == 0 ? k / 4 : k % 2;
            sum += emulated_element(kind, emulated_fragments[warp + a_lane].a, a_index) *
                   emulated_element(kind, emulated_fragments[warp + b_lane].b, b_index);
        }
        d[i] = sum;
    }
    __syncthreads();  // every lane has read the fragments before they are overwritten
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
