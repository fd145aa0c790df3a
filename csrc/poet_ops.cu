// POET's GPU kernels: Cayley–Neumann rotation blocks from packed skew parameters, and permuted
// block-diagonal rotations of activations or weights, each with its backward.
//
// Conventions shared with poet_peft/ops/kernels.py, which launches these:
// - every block has POET_THREADS threads in x; every integer argument is a long long;
// - a rotation block of size s acts on the permuted coordinates perm[start + k·s … start + k·s + s);
// - packed skew parameters hold the strict upper triangle of Q row by row (torch.triu_indices order);
// - data may be float, double, half or bfloat16 (the last two passed as 16-bit words); rotation blocks,
//   skew parameters and all arithmetic are float (double for double data).
// The file also compiles as C++ on the CPU (POET_EMULATED), where tests run it thread by thread.

#define POET_THREADS 256
#define POET_MAX_OUTPUTS 16

#ifndef POET_EMULATED
extern __shared__ __align__(16) unsigned char poet_shared[];
#endif

struct poet_half {
    unsigned short bits;
};
struct poet_bf16 {
    unsigned short bits;
};

template <typename T>
struct Accumulator {
    typedef float type;
};
template <>
struct Accumulator<double> {
    typedef double type;
};

#ifdef __CUDA_ARCH__
__device__ __forceinline__ float float_from_bits(unsigned int bits) { return __uint_as_float(bits); }
__device__ __forceinline__ unsigned int bits_from_float(float value) { return __float_as_uint(value); }
#else
__device__ __forceinline__ float float_from_bits(unsigned int bits) {
    float value;
    __builtin_memcpy(&value, &bits, 4);
    return value;
}
__device__ __forceinline__ unsigned int bits_from_float(float value) {
    unsigned int bits;
    __builtin_memcpy(&bits, &value, 4);
    return bits;
}
#endif

__device__ __forceinline__ float to_acc(float value) { return value; }
__device__ __forceinline__ double to_acc(double value) { return value; }
__device__ __forceinline__ float to_acc(poet_bf16 value) { return float_from_bits((unsigned int)value.bits << 16); }

__device__ __forceinline__ float to_acc(poet_half value) {
#ifdef __CUDA_ARCH__
    float result;
    asm("cvt.f32.f16 %0, %1;" : "=f"(result) : "h"(value.bits));
    return result;
#else
    unsigned int sign = (unsigned int)(value.bits & 0x8000) << 16;
    unsigned int exponent = (value.bits >> 10) & 0x1f, mantissa = value.bits & 0x3ff;
    if (exponent == 0) {  // zero or subnormal: mantissa · 2⁻²⁴, exact in float
        float magnitude = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 31) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));
    return float_from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13));
#endif
}

template <typename T>
__device__ __forceinline__ T from_acc(typename Accumulator<T>::type value);

template <>
__device__ __forceinline__ float from_acc<float>(float value) { return value; }
template <>
__device__ __forceinline__ double from_acc<double>(double value) { return value; }

template <>
__device__ __forceinline__ poet_bf16 from_acc<poet_bf16>(float value) {
    unsigned int bits = bits_from_float(value);
    poet_bf16 result;
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        result.bits = 0x7fc0;  // NaN stays NaN
    } else {
        bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
        result.bits = (unsigned short)(bits >> 16);
    }
    return result;
}

template <>
__device__ __forceinline__ poet_half from_acc<poet_half>(float value) {
    poet_half result;
#ifdef __CUDA_ARCH__
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(result.bits) : "f"(value));
#else
    unsigned int bits = bits_from_float(value);
    unsigned int sign = (bits >> 16) & 0x8000u, magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) {
        result.bits = (unsigned short)(sign | 0x7e00u);
    } else if (magnitude >= 0x477ff000u) {  // 65520 and above round to infinity
        result.bits = (unsigned short)(sign | 0x7c00u);
    } else if (magnitude < 0x38800000u) {  // below 2⁻¹⁴: a subnormal half, counted in units of 2⁻²⁴
        float units = float_from_bits(magnitude) * 16777216.0f;
        result.bits = (unsigned short)(sign | (unsigned int)__builtin_rintf(units));
    } else {
        unsigned int rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
        result.bits = (unsigned short)(sign | ((rounded - 0x38000000u) >> 13));
    }
#endif
    return result;
}

// Index of Q[row][col], row < col, in the packed strict upper triangle of a size×size matrix.
__device__ __forceinline__ long long packed_index(long long row, long long col, long long size) {
    return row * size - row * (row + 1) / 2 + (col - row - 1);
}

// Q = U − Uᵀ read straight from its packed upper triangle U, times `sign`: Q is never stored.
template <typename Acc>
struct SkewOperand {
    const Acc* packed;
    long long size;
    Acc sign;
    __device__ Acc operator()(long long row, long long col) const {
        if (row == col) return Acc(0);
        if (row < col) return sign * packed[packed_index(row, col, size)];
        return -sign * packed[packed_index(col, row, size)];
    }
};

// A dense size×size matrix, row-major, or its transpose.
template <typename Acc>
struct DenseOperand {
    const Acc* matrix;
    long long size;
    bool transpose;
    __device__ Acc operator()(long long row, long long col) const {
        return transpose ? matrix[col * size + row] : matrix[row * size + col];
    }
};

// Calls visit(k, o) for the outputs o = threadIdx.x + k·POET_THREADS of a rows×cols tile owned by this thread;
// output o is (i, c) = (o / cols, o % cols), c fastest, so neighbouring threads touch neighbouring columns.
template <typename Visit>
__device__ __forceinline__ void for_each_output(long long rows, long long cols, Visit visit) {
#pragma unroll
    for (int k = 0; k < POET_MAX_OUTPUTS; ++k) {
        long long o = threadIdx.x + (long long)k * POET_THREADS;
        if (o < rows * cols) visit(k, o);
    }
}

// acc = A·V for this thread's outputs, where A is a rows×rows operand and V a rows×cols tile in shared memory.
// A is staged through `a_tile` (rows×depth) one slab of columns at a time. Starts with a barrier, so V may
// have been written just before; V must stay unchanged until the caller's next barrier.
template <typename Acc, typename Operand>
__device__ void tile_product(const Operand& a, const Acc* v, Acc* a_tile, Acc (&acc)[POET_MAX_OUTPUTS],
                             long long rows, long long cols, long long depth) {
#pragma unroll
    for (int k = 0; k < POET_MAX_OUTPUTS; ++k) acc[k] = Acc(0);
    for (long long l0 = 0; l0 < rows; l0 += depth) {
        long long width = rows - l0 < depth ? rows - l0 : depth;
        __syncthreads();  // earlier readers of a_tile are done, and writers of v
        for (long long e = threadIdx.x; e < rows * depth; e += POET_THREADS) {
            long long i = e / depth, l = e % depth;
            a_tile[e] = l < width ? a(i, l0 + l) : Acc(0);
        }
        __syncthreads();
        for_each_output(rows, cols, [&](int k, long long o) {
            long long i = o / cols, c = o % cols;
            Acc sum = acc[k];
            for (long long l = 0; l < width; ++l) sum += a_tile[i * depth + l] * v[(l0 + l) * cols + c];
            acc[k] = sum;
        });
    }
}

// Rotation blocks R = (I + Q)(I + Q + … + Q^terms) by Horner's scheme S ← I + Q·S, column tile by column
// tile: block y is rotation block blockIdx.y, block x owns columns [x·cols, x·cols + cols).
template <typename Acc>
__global__ void __launch_bounds__(POET_THREADS, 2)
cayley_neumann_forward(const Acc* __restrict__ packed, Acc* __restrict__ rotations, long long size,
                                       long long terms, long long cols, long long depth) {
    Acc* series = reinterpret_cast<Acc*>(poet_shared);  // size×cols: the columns of S
    Acc* a_tile = series + size * cols;
    long long block = blockIdx.y, col0 = (long long)blockIdx.x * cols;
    SkewOperand<Acc> skew = {packed + block * (size * (size - 1) / 2), size, Acc(1)};
    for (long long e = threadIdx.x; e < size * cols; e += POET_THREADS)
        series[e] = e / cols == col0 + e % cols ? Acc(1) : Acc(0);
    Acc product[POET_MAX_OUTPUTS];
    for (long long step = 0; step <= terms; ++step) {
        tile_product(skew, series, a_tile, product, size, cols, depth);
        __syncthreads();  // every thread has read S before anyone overwrites it
        for_each_output(size, cols, [&](int k, long long o) {
            long long i = o / cols, j = col0 + o % cols;
            if (step < terms)
                series[o] = (i == j ? Acc(1) : Acc(0)) + product[k];
            else if (j < size)  // R = S + Q·S
                rotations[(block * size + i) * size + j] = series[o] + product[k];
        });
    }
}

// Gradient of the packed parameters from the gradient G of R (reverse of the forward's Horner scheme):
// dQ = G·Sₙᵀ + Σₜ Ḡₜ₊₁·Sₜᵀ, computed a column tile at a time as dQ·e = G·uₙ + (I − Q)·Σₜ (−Q)^(n−1−t)·G·uₜ
// with uₜ = Sₜᵀ·e (u₀ = e, uₜ₊₁ = e − Q·uₜ). The packed gradient is dQ[i][j] − dQ[j][i]; the two halves come
// from different tiles, so each is added atomically into a zeroed output (two terms: order-independent).
template <typename Acc>
__global__ void __launch_bounds__(POET_THREADS, 2)
cayley_neumann_backward(const Acc* __restrict__ packed, const Acc* __restrict__ grad_rotations,
                                        Acc* __restrict__ grad_packed, long long size, long long terms, long long cols,
                                        long long depth) {
    Acc* basis = reinterpret_cast<Acc*>(poet_shared);  // size×cols: uₜ
    Acc* sum = basis + size * cols;                     // size×cols: Σ (−Q)^(t−1−s)·G·uₛ so far
    Acc* a_tile = sum + size * cols;
    long long block = blockIdx.y, col0 = (long long)blockIdx.x * cols, triangle = size * (size - 1) / 2;
    SkewOperand<Acc> skew = {packed + block * triangle, size, Acc(1)};
    DenseOperand<Acc> grad = {grad_rotations + block * size * size, size, false};
    for (long long e = threadIdx.x; e < size * cols; e += POET_THREADS) {
        basis[e] = e / cols == col0 + e % cols ? Acc(1) : Acc(0);
        sum[e] = Acc(0);
    }
    Acc grad_basis[POET_MAX_OUTPUTS], skew_sum[POET_MAX_OUTPUTS], skew_basis[POET_MAX_OUTPUTS];
    for (long long step = 0; step < terms; ++step) {
        tile_product(grad, basis, a_tile, grad_basis, size, cols, depth);
        tile_product(skew, sum, a_tile, skew_sum, size, cols, depth);
        tile_product(skew, basis, a_tile, skew_basis, size, cols, depth);
        __syncthreads();
        for_each_output(size, cols, [&](int k, long long o) {
            long long i = o / cols, j = col0 + o % cols;
            sum[o] = grad_basis[k] - skew_sum[k];
            basis[o] = (i == j ? Acc(1) : Acc(0)) - skew_basis[k];
        });
    }
    tile_product(grad, basis, a_tile, grad_basis, size, cols, depth);
    tile_product(skew, sum, a_tile, skew_sum, size, cols, depth);
    Acc* out = grad_packed + block * triangle;
    for_each_output(size, cols, [&](int k, long long o) {
        long long i = o / cols, j = col0 + o % cols;
        if (j < size && i != j) {
            Acc value = grad_basis[k] + sum[o] - skew_sum[k];
            if (i < j)
                atomicAdd(out + packed_index(i, j, size), value);
            else
                atomicAdd(out + packed_index(j, i, size), -value);
        }
    });
}

// y[n, π(i)] = Σⱼ B[i][j]·x[n, π(j)] (Bᵀ if transpose) for the rotation blocks B of one layout group, where
// π(i) = perm[start + blockIdx.y·size + i]. The gather and scatter through π are fused into the loads and
// stores. Strides are in elements, so a transposed weight needs no copy. Block x owns rows [x·cols, x·cols + cols).
template <typename T>
__global__ void __launch_bounds__(POET_THREADS, 2)
block_rotate(const T* __restrict__ x, long long x_row_stride, long long x_col_stride, long long rows,
                             T* __restrict__ y, long long y_row_stride, long long y_col_stride,
                             const long long* __restrict__ perm, long long start, long long size,
                             const typename Accumulator<T>::type* __restrict__ blocks, long long transpose,
                             long long cols, long long depth) {
    typedef typename Accumulator<T>::type Acc;
    Acc* gathered = reinterpret_cast<Acc*>(poet_shared);  // size×cols: x's rows of this tile, as columns
    Acc* a_tile = gathered + size * cols;
    long long block = blockIdx.y, row0 = (long long)blockIdx.x * cols;
    const long long* index = perm + start + block * size;
    for (long long e = threadIdx.x; e < size * cols; e += POET_THREADS) {
        long long l = e / cols, n = row0 + e % cols;
        gathered[e] = n < rows ? to_acc(x[n * x_row_stride + index[l] * x_col_stride]) : Acc(0);
    }
    DenseOperand<Acc> rotation = {blocks + block * size * size, size, transpose != 0};
    Acc product[POET_MAX_OUTPUTS];
    tile_product(rotation, gathered, a_tile, product, size, cols, depth);
    for_each_output(size, cols, [&](int k, long long o) {
        long long i = o / cols, n = row0 + o % cols;
        if (n < rows) y[n * y_row_stride + index[i] * y_col_stride] = from_acc<T>(product[k]);
    });
}

#define POET_GRAD_TILE 32
#define POET_GRAD_CHUNK 32

// Partial gradients of the rotation blocks: G[i][j] = Σₙ a[n, π(i)]·b[n, π(j)] over the rows n of slice
// blockIdx.z (of gridDim.z equal slices), written to grad[blockIdx.z]. With a = dy, b = x this is dL/dB;
// for the transposed rotation, swap a and b. Block x is one 32×32 tile of G, block y the rotation block.
template <typename T>
__global__ void __launch_bounds__(POET_THREADS, 2)
block_rotate_grad_blocks(const T* __restrict__ a, long long a_row_stride, long long a_col_stride,
                                         const T* __restrict__ b, long long b_row_stride, long long b_col_stride,
                                         long long rows, const long long* __restrict__ perm, long long start,
                                         long long size, typename Accumulator<T>::type* __restrict__ grad) {
    typedef typename Accumulator<T>::type Acc;
    Acc* a_chunk = reinterpret_cast<Acc*>(poet_shared);  // POET_GRAD_CHUNK rows × POET_GRAD_TILE
    Acc* b_chunk = a_chunk + POET_GRAD_CHUNK * POET_GRAD_TILE;
    long long tiles = (size + POET_GRAD_TILE - 1) / POET_GRAD_TILE;
    long long i0 = (blockIdx.x / tiles) * POET_GRAD_TILE, j0 = (blockIdx.x % tiles) * POET_GRAD_TILE;
    long long block = blockIdx.y, slice = (rows + gridDim.z - 1) / gridDim.z;
    long long first = blockIdx.z * slice, last = first + slice < rows ? first + slice : rows;
    const long long* index = perm + start + block * size;
    const int outputs = POET_GRAD_TILE * POET_GRAD_TILE / POET_THREADS;
    Acc acc[outputs];
#pragma unroll
    for (int k = 0; k < outputs; ++k) acc[k] = Acc(0);
    for (long long n0 = first; n0 < last; n0 += POET_GRAD_CHUNK) {
        __syncthreads();
        for (long long e = threadIdx.x; e < POET_GRAD_CHUNK * POET_GRAD_TILE; e += POET_THREADS) {
            long long n = n0 + e / POET_GRAD_TILE, i = i0 + e % POET_GRAD_TILE, j = j0 + e % POET_GRAD_TILE;
            bool row_in = n < last;
            a_chunk[e] = row_in && i < size ? to_acc(a[n * a_row_stride + index[i] * a_col_stride]) : Acc(0);
            b_chunk[e] = row_in && j < size ? to_acc(b[n * b_row_stride + index[j] * b_col_stride]) : Acc(0);
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < outputs; ++k) {
            long long o = threadIdx.x + (long long)k * POET_THREADS;
            long long i = o / POET_GRAD_TILE, j = o % POET_GRAD_TILE;
            Acc sum = acc[k];
            for (long long r = 0; r < POET_GRAD_CHUNK; ++r)
                sum += a_chunk[r * POET_GRAD_TILE + i] * b_chunk[r * POET_GRAD_TILE + j];
            acc[k] = sum;
        }
    }
    Acc* out = grad + (blockIdx.z * gridDim.y + block) * size * size;
#pragma unroll
    for (int k = 0; k < outputs; ++k) {
        long long o = threadIdx.x + (long long)k * POET_THREADS;
        long long i = i0 + o / POET_GRAD_TILE, j = j0 + o % POET_GRAD_TILE;
        if (i < size && j < size) out[i * size + j] = acc[k];
    }
}


// ---- Tensor cores: mma.sync m16n8k8 with fp32 accumulation (sm_80+), TF32 for float data, bf16 and fp16 native.
// Fragment layouts as in the PTX ISA ("Matrix Fragments for mma.m16n8k8"), with g = lane / 4 and t = lane % 4:
// A (16×8) holds rows g and g + 8, B (8×8) column g, C (16×8) rows g, g + 8 and columns 2t, 2t + 1. TF32 keeps
// one element per register (A's columns t and t + 4, B's rows t and t + 4); 16-bit types pack two, the lower
// index in the lower half (A's columns 2t and 2t + 1, B's rows 2t and 2t + 1).

#define POET_MMA_TILE 64                        // a thread block's output tile is 64×64: 8 warps of 32×16
#define POET_MMA_DEPTH 16                       // reduction elements staged in shared memory per step
#define POET_MMA_A_STRIDE (POET_MMA_DEPTH + 4)  // padded rows of the staged A (64 × DEPTH) and B (DEPTH × 64)
#define POET_MMA_B_STRIDE (POET_MMA_TILE + 8)

// How data of type T enters the tensor cores: the word one staged element occupies, and the rounding to it.
template <typename T>
struct TensorCore;
template <>
struct TensorCore<float> {  // TF32: to nearest (ties away from zero) at 10 mantissa bits, in a 32-bit word
    typedef unsigned int word;
    static constexpr int kind = 0;
    __device__ static word encode(float value) {
#ifdef __CUDA_ARCH__
        word bits;
        asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(bits) : "f"(value));
        return bits;
#else
        word bits = bits_from_float(value);
        return (bits & 0x7f800000u) == 0x7f800000u ? bits : (bits + 0x1000u) & 0xffffe000u;
#endif
    }
};
template <>
struct TensorCore<poet_bf16> {
    typedef unsigned short word;
    static constexpr int kind = 1;
    __device__ static word encode(float value) { return from_acc<poet_bf16>(value).bits; }
};
template <>
struct TensorCore<poet_half> {
    typedef unsigned short word;
    static constexpr int kind = 2;
    __device__ static word encode(float value) { return from_acc<poet_half>(value).bits; }
};

// d += A·B for one warp's fragments (16-bit types use a[0..1] and b[0]). The emulator models the instruction.
template <typename T>
__device__ __forceinline__ void warp_mma(float (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2]) {
#ifdef POET_EMULATED
    emulated_warp_mma(TensorCore<T>::kind, d, a, b);
#else
    if constexpr (TensorCore<T>::kind == 0)
        asm volatile(
            "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    else if constexpr (TensorCore<T>::kind == 1)
        asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(b[0]));
    else
        asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(b[0]));
#endif
}

// This thread block's 64×64 tile D[m][n] = Σₖ A[m][k]·B[k][n], k < depth, on tensor cores: A and B are read as
// floats through load_a(m, k) and load_b(k, n) (which return 0 outside the operands), staged DEPTH elements of k
// at a time, and each result goes to store(m, n, value). a_k_fastest / b_n_fastest say which index neighbouring
// threads should step through when loading (the one along which the operand is contiguous in memory). Every
// thread of the block must call this (the emulator's model of mma.sync relies on it).
template <typename T, typename LoadA, typename LoadB, typename Store>
__device__ void tensor_core_tile(const LoadA& load_a, bool a_k_fastest, const LoadB& load_b, bool b_n_fastest,
                                 long long depth, const Store& store) {
    typedef typename TensorCore<T>::word Word;
    Word* a_stage = reinterpret_cast<Word*>(poet_shared);  // 64 rows m × DEPTH
    Word* b_stage = a_stage + POET_MMA_TILE * POET_MMA_A_STRIDE;  // DEPTH rows k × 64
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    int m_warp = (warp / 4) * 32, n_warp = (warp % 4) * 16;
    float acc[2][2][4];
#pragma unroll
    for (int e = 0; e < 16; ++e) acc[e / 8][(e / 4) % 2][e % 4] = 0.0f;
    for (long long k0 = 0; k0 < depth; k0 += POET_MMA_DEPTH) {
        __syncthreads();  // the previous step's fragments are read
        for (int e = threadIdx.x; e < POET_MMA_TILE * POET_MMA_DEPTH; e += POET_THREADS) {
            int m = a_k_fastest ? e / POET_MMA_DEPTH : e % POET_MMA_TILE;
            int k = a_k_fastest ? e % POET_MMA_DEPTH : e / POET_MMA_TILE;
            a_stage[m * POET_MMA_A_STRIDE + k] = TensorCore<T>::encode(k0 + k < depth ? load_a(m, k0 + k) : 0.0f);
            int n = b_n_fastest ? e % POET_MMA_TILE : e / POET_MMA_DEPTH;
            int kb = b_n_fastest ? e / POET_MMA_TILE : e % POET_MMA_DEPTH;
            b_stage[kb * POET_MMA_B_STRIDE + n] = TensorCore<T>::encode(k0 + kb < depth ? load_b(k0 + kb, n) : 0.0f);
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < POET_MMA_DEPTH; kk += 8) {
            unsigned int a[2][4], b[2][2];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                const Word* row = a_stage + (m_warp + mt * 16 + g) * POET_MMA_A_STRIDE + kk;
                const Word* row8 = row + 8 * POET_MMA_A_STRIDE;
                if constexpr (TensorCore<T>::kind == 0) {
                    a[mt][0] = row[t], a[mt][1] = row8[t], a[mt][2] = row[t + 4], a[mt][3] = row8[t + 4];
                } else {
                    a[mt][0] = row[2 * t] | (unsigned int)row[2 * t + 1] << 16;
                    a[mt][1] = row8[2 * t] | (unsigned int)row8[2 * t + 1] << 16;
                    a[mt][2] = a[mt][3] = 0;
                }
            }
#pragma unroll
            for (int nt = 0; nt < 2; ++nt) {
                const Word* column = b_stage + kk * POET_MMA_B_STRIDE + n_warp + nt * 8 + g;
                if constexpr (TensorCore<T>::kind == 0) {
                    b[nt][0] = column[t * POET_MMA_B_STRIDE], b[nt][1] = column[(t + 4) * POET_MMA_B_STRIDE];
                } else {
                    b[nt][0] = column[2 * t * POET_MMA_B_STRIDE] | (unsigned int)column[(2 * t + 1) * POET_MMA_B_STRIDE]
                                                                      << 16;
                    b[nt][1] = 0;
                }
            }
#pragma unroll
            for (int mt = 0; mt < 2; ++mt)
#pragma unroll
                for (int nt = 0; nt < 2; ++nt) warp_mma<T>(acc[mt][nt], a[mt], b[nt]);
        }
    }
#pragma unroll
    for (int e = 0; e < 16; ++e) {
        int mt = e / 8, nt = (e / 4) % 2, i = e % 4;
        store(m_warp + mt * 16 + g + 8 * (i / 2), n_warp + nt * 8 + 2 * t + (i % 2), acc[mt][nt][i]);
    }
}

// block_rotate on tensor cores, for float (as TF32), bfloat16 and half data: y[n, π(i)] = Σⱼ B[i][j]·x[n, π(j)]
// (Bᵀ if transpose), the gather and scatter through π fused into the loads and stores. Block x owns rows
// [64·x, 64·x + 64), block y is the rotation block, block z its outputs i in [64·z, 64·z + 64).
template <typename T>
__global__ void __launch_bounds__(POET_THREADS, 2)
block_rotate_mma(const T* __restrict__ x, long long x_row_stride, long long x_col_stride, long long rows,
                 T* __restrict__ y, long long y_row_stride, long long y_col_stride, const long long* __restrict__ perm,
                 long long start, long long size, const float* __restrict__ blocks, long long transpose) {
    long long block = blockIdx.y, n0 = (long long)blockIdx.x * POET_MMA_TILE;
    long long i0 = (long long)blockIdx.z * POET_MMA_TILE;
    const long long* index = perm + start + block * size;
    const float* rotation = blocks + block * size * size;
    auto load_a = [&](long long m, long long k) -> float {
        long long i = i0 + m;
        return i < size ? (transpose ? rotation[k * size + i] : rotation[i * size + k]) : 0.0f;
    };
    auto load_b = [&](long long k, long long n) -> float {
        return n0 + n < rows ? to_acc(x[(n0 + n) * x_row_stride + index[k] * x_col_stride]) : 0.0f;
    };
    auto store = [&](long long m, long long n, float value) {
        if (i0 + m < size && n0 + n < rows) y[(n0 + n) * y_row_stride + index[i0 + m] * y_col_stride] = from_acc<T>(value);
    };
    tensor_core_tile<T>(load_a, transpose == 0, load_b, x_row_stride == 1, size, store);
}

// block_rotate_grad_blocks on tensor cores: the partial G[i][j] = Σₙ a[n, π(i)]·b[n, π(j)] over the rows of slice
// blockIdx.z, in 64×64 tiles (block x), for rotation block y; written to grad[blockIdx.z] as the CUDA-core kernel.
template <typename T>
__global__ void __launch_bounds__(POET_THREADS, 2)
block_rotate_grad_blocks_mma(const T* __restrict__ a, long long a_row_stride, long long a_col_stride,
                             const T* __restrict__ b, long long b_row_stride, long long b_col_stride, long long rows,
                             const long long* __restrict__ perm, long long start, long long size,
                             float* __restrict__ grad) {
    long long tiles = (size + POET_MMA_TILE - 1) / POET_MMA_TILE;
    long long i0 = (blockIdx.x / tiles) * POET_MMA_TILE, j0 = (blockIdx.x % tiles) * POET_MMA_TILE;
    long long block = blockIdx.y, slice = (rows + gridDim.z - 1) / gridDim.z;
    long long first = blockIdx.z * slice, last = first + slice < rows ? first + slice : rows;
    const long long* index = perm + start + block * size;
    auto load_a = [&](long long m, long long k) -> float {
        return i0 + m < size ? to_acc(a[(first + k) * a_row_stride + index[i0 + m] * a_col_stride]) : 0.0f;
    };
    auto load_b = [&](long long k, long long n) -> float {
        return j0 + n < size ? to_acc(b[(first + k) * b_row_stride + index[j0 + n] * b_col_stride]) : 0.0f;
    };
    float* out = grad + (blockIdx.z * gridDim.y + block) * size * size;
    auto store = [&](long long m, long long n, float value) {
        if (i0 + m < size && j0 + n < size) out[(i0 + m) * size + j0 + n] = value;
    };
    tensor_core_tile<T>(load_a, a_row_stride == 1, load_b, false, last > first ? last - first : 0, store);
}
