// Tree attention for one verify step: split and merge (docs/algorithms.md §5).
//
// Every sequence b of the batch has L_b tokens already cached (rows 0..L_b-1 of its slot) and a
// draft tree of N_b nodes whose keys/values the runner has written to rows L_b..L_b+N_b-1. Each
// tree node (query) attends to the whole prefix and to its tree ancestors (and itself):
//
//   (a) prefix part: G*N_b query rows per kv head against L_b unmasked keys, cut into
//       `num_prefix_splits` key ranges of `chunk` keys (split-K) so long prefixes fill the GPU;
//   (b) tree part:   the same rows against the N_b tree keys under the ancestor bitmask;
//   (c) merge:       the partial results are combined by log-sum-exp (base 2 throughout).
//
// The merge is exact: a segment s of keys (a prefix split, or the tree) yields its softmax-
// normalised output o_s and lse_s = log2 of the sum, over its visible keys, of exp2(x) with
// x = q.k * scale * log2(e). Attention over all the segments' keys is sum_s w_s o_s / sum_s w_s
// with w_s = exp2(lse_s - max_s lse_s); an empty segment has lse_s = -inf and weight 0.
//
// (a) and (b) are one kernel (`..._partial_...`, grid.y = split index, the last split being the
// tree part), (c) is `..._merge_...`. Each partial block loads its keys/values once for all the
// query heads that share the kv head (grouped-query attention) and all tree nodes.
//
// Glossary: B batch, Hq query heads, Hkv kv heads, G = Hq / Hkv, Nmax padded node count,
// D head dim, S_tot = num_prefix_splits + 1, W = ceil(Nmax / 32).
//
// Layouts (elements; every index below is in elements, not bytes):
//   q          [B, Hq, Nmax, D]      any strides on B, Hq, Nmax (passed in), unit stride on D
//   k/v cache  [slots, Hkv, max_len, D]   contiguous
//   slots, prefix_lens, num_nodes      int32 [B]
//   mask_bits  uint32 [B, Nmax, W]: bit j%32 of word j/32 of row (b, i) set <=> node i sees node j
//   o_part     float32 [B, Hq, Nmax, S_tot, D]  normalised partial outputs
//   lse_part   float32 [B, Hq, Nmax, S_tot]     base-2 log-sum-exp of the scaled scores
//   out        T [B, Nmax, Hq, D]    (the transformers attention-function output layout)
// Padding rows (n >= N_b) get zeros in `out`. A partial block whose key range or query rows are
// empty writes nothing; the merge knows from (prefix_lens, num_nodes, chunk) which splits exist.
//
// Built at run time by NVRTC (server/models/kernels/compile.py) without any CUDA header: 16-bit
// types are stored as raw bits and converted by hand. Kernels use only static shared memory
// (< 48 KB) and do no allocation or host synchronisation, so they can be captured in CUDA graphs.
// server/models/kernels/tree_attention.py launches them and mirrors the launch geometry below
// (kThreads, kRowsPerBlock, kKeyTile).
// With HEDGEROW_HOST_EMULATION defined, the file also compiles as host C++ against the small
// emulation layer in tests/emulator/cuda_emulator.cpp, which runs the kernels on the CPU.

#ifndef HEDGEROW_HOST_EMULATION
// cvt.f32.f16 / cvt.rn.f16.f32 exist on every architecture NVRTC targets.
__device__ __forceinline__ float hr_f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ unsigned short hr_f32_to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

namespace hedgerow_tree_attn {

constexpr int kWarps = 4;                            // warps per block
constexpr int kThreads = kWarps * 32;                // threads per block (mirrored in Python)
constexpr int kRowsPerWarp = 4;                      // query rows per warp
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp; // 16 (mirrored in Python)
constexpr int kKeyTile = 32;                         // keys per shared-memory tile: one per lane

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

struct f16 { unsigned short bits; };
struct bf16 { unsigned short bits; };

template <typename T> struct Elem;
template <> struct Elem<float> {
    static __device__ __forceinline__ float to_float(float x) { return x; }
    static __device__ __forceinline__ float from_float(float x) { return x; }
};
template <> struct Elem<f16> {
    static __device__ __forceinline__ float to_float(f16 x) { return hr_f16_to_f32(x.bits); }
    static __device__ __forceinline__ f16 from_float(float x) {
        f16 r;
        r.bits = hr_f32_to_f16(x);
        return r;
    }
};
template <> struct Elem<bf16> {
    static __device__ __forceinline__ float to_float(bf16 x) {
        return __uint_as_float(static_cast<unsigned int>(x.bits) << 16);
    }
    // Round to nearest even, NaN kept quiet (bit-exact with cvt.rn.bf16.f32, any architecture).
    static __device__ __forceinline__ bf16 from_float(float x) {
        unsigned int u = __float_as_uint(x);
        bf16 r;
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            r.bits = static_cast<unsigned short>(((u >> 16) & 0x8000u) | 0x7fc0u);
        } else {
            u += 0x7fffu + ((u >> 16) & 1u);
            r.bits = static_cast<unsigned short>(u >> 16);
        }
        return r;
    }
};

// An aligned vector of BYTES bytes, moved with one load or store instruction.
template <int BYTES> struct Vec;
template <> struct Vec<4> { typedef unsigned int type; };
template <> struct Vec<8> { typedef uint2 type; };
template <> struct Vec<16> { typedef uint4 type; };

// NUM consecutive elements at p (aligned to NUM * sizeof(T) bytes) as floats.
template <typename T, int NUM>
__device__ __forceinline__ void load_floats(const T* p, float* out) {
    typedef typename Vec<NUM * sizeof(T)>::type V;
    const V v = *reinterpret_cast<const V*>(p);
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < NUM; ++i) out[i] = Elem<T>::to_float(e[i]);
}

template <typename T, int NUM>
__device__ __forceinline__ void store_floats(T* p, const float* in) {
    typedef typename Vec<NUM * sizeof(T)>::type V;
    V v;
    T* e = reinterpret_cast<T*>(&v);
#pragma unroll
    for (int i = 0; i < NUM; ++i) e[i] = Elem<T>::from_float(in[i]);
    *reinterpret_cast<V*>(p) = v;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// One sequence's geometry, clamped so that no launch reads or writes out of bounds whatever the
// index tensors hold. An invalid slot, a non-positive node count or L >= max_len gives N = 0
// (nothing to compute, zeros out). The partial and merge kernels must agree on this exactly.
struct SeqGeom {
    int slot;
    int L;  // cached prefix rows
    int N;  // tree nodes (query rows and tree key rows)
};

__device__ __forceinline__ SeqGeom seq_geom(int b, const int* slots, const int* prefix_lens,
                                            const int* num_nodes, int num_slots, int max_len,
                                            int n_max) {
    SeqGeom g;
    g.slot = slots[b];
    g.L = prefix_lens[b];
    g.N = num_nodes[b];
    if (g.slot < 0 || g.slot >= num_slots || g.L < 0 || g.N <= 0 || g.L >= max_len) {
        g.slot = 0;
        g.L = 0;
        g.N = 0;
        return g;
    }
    g.N = imin(imin(g.N, n_max), max_len - g.L);
    return g;
}

// Keys [kbeg, kend) of split `split`: prefix splits cover `chunk` keys each, the last prefix split
// runs to L whatever `chunk` says (so a too-small host bound costs balance, never correctness),
// and split `num_prefix_splits` is the tree.
__device__ __forceinline__ void split_range(const SeqGeom& g, int split, int chunk,
                                            int num_prefix_splits, int* kbeg, int* kend) {
    if (split == num_prefix_splits) {
        *kbeg = g.L;
        *kend = g.L + g.N;
    } else {
        *kbeg = split * chunk;
        *kend = (split == num_prefix_splits - 1) ? g.L : imin(*kbeg + chunk, g.L);
    }
}

// grid = (ceil(G * Nmax / kRowsPerBlock), num_prefix_splits + 1, B * Hkv), block = kThreads.
// Query row r of a (b, kv head) is tree node r / G of q head kvh * G + r % G, so a sequence's valid
// rows are the first G * N_b and the trailing row tiles of short trees exit at once.
template <typename T, int D>
__device__ __forceinline__ void tree_attn_partial(
    const T* __restrict__ q, long long q_sb, long long q_sh, long long q_sn,
    const T* __restrict__ k_cache, const T* __restrict__ v_cache, const int* __restrict__ slots,
    const int* __restrict__ prefix_lens, const int* __restrict__ num_nodes,
    const unsigned int* __restrict__ mask_bits, float* __restrict__ o_part,
    float* __restrict__ lse_part, int num_slots, int hq, int hkv, int max_len, int n_max,
    int mask_words, int chunk, int num_prefix_splits, float scale_log2) {
    constexpr int VEC = 16 / sizeof(T);  // elements per 16-byte access
    constexpr int ROW = D + VEC;         // padded smem row: lanes' 16-byte K reads hit distinct banks
    constexpr int DPL = D / 32;          // output dims per lane
    static_assert(D % 32 == 0 && D % VEC == 0, "head dim");
    static_assert(kRowsPerWarp == 4, "p_s is read as float4");

    alignas(16) __shared__ float q_s[kRowsPerBlock * D];  // query rows * scale * log2(e)
    alignas(16) __shared__ T k_s[kKeyTile * ROW];
    alignas(16) __shared__ T v_s[kKeyTile * ROW];
    alignas(16) __shared__ float p_s[kWarps][kKeyTile][kRowsPerWarp];  // softmax weights of a tile

    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int b = blockIdx.z / hkv;
    const int kvh = blockIdx.z % hkv;
    const int group = hq / hkv;
    const int split = blockIdx.y;
    const int s_tot = num_prefix_splits + 1;
    const bool is_tree = split == num_prefix_splits;

    const SeqGeom g = seq_geom(b, slots, prefix_lens, num_nodes, num_slots, max_len, n_max);
    const int rows = group * g.N;
    const int row0 = blockIdx.x * kRowsPerBlock;
    int kbeg, kend;
    split_range(g, split, chunk, num_prefix_splits, &kbeg, &kend);
    if (row0 >= rows || kbeg >= kend) return;  // uniform over the block, before any barrier

    // Stage this block's 16 query rows (zeros past the last valid row).
    for (int c = tid; c < kRowsPerBlock * (D / VEC); c += kThreads) {
        const int r = c / (D / VEC);
        const int d = (c % (D / VEC)) * VEC;
        const int row = row0 + r;
        float f[VEC];
        if (row < rows) {
            const int n = row / group;
            const int h = kvh * group + row % group;
            load_floats<T, VEC>(q + b * q_sb + h * q_sh + n * q_sn + d, f);
#pragma unroll
            for (int i = 0; i < VEC; ++i) f[i] *= scale_log2;
        } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) f[i] = 0.f;
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) q_s[r * D + d + i] = f[i];
    }

    bool row_ok[kRowsPerWarp];
    int node[kRowsPerWarp];
    float m[kRowsPerWarp];    // running max (base-2 scaled scores), same on every lane
    float l[kRowsPerWarp];    // running sum of exp2(score - m), this lane's keys only
    float acc[kRowsPerWarp][DPL];  // running output, dims lane*DPL .. lane*DPL+DPL-1
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
        const int row = row0 + warp * kRowsPerWarp + r;
        row_ok[r] = row < rows;
        node[r] = row_ok[r] ? row / group : 0;
        m[r] = neg_inf();
        l[r] = 0.f;
#pragma unroll
        for (int i = 0; i < DPL; ++i) acc[r][i] = 0.f;
    }

    const long long head_base = (static_cast<long long>(g.slot) * hkv + kvh) * max_len * D;
    for (int t0 = kbeg; t0 < kend; t0 += kKeyTile) {
        __syncthreads();  // the previous tile (and p_s) is consumed; q_s is complete
        // Stage keys/values t0 .. t0+31; rows past kend are zeros (never read from global memory),
        // so they cannot bring NaN into the products below.
        for (int c = tid; c < kKeyTile * (D / VEC); c += kThreads) {
            const int j = c / (D / VEC);
            const int d = (c % (D / VEC)) * VEC;
            uint4 kv = make_uint4(0u, 0u, 0u, 0u);
            uint4 vv = make_uint4(0u, 0u, 0u, 0u);
            if (t0 + j < kend) {
                const long long off = head_base + static_cast<long long>(t0 + j) * D + d;
                kv = *reinterpret_cast<const uint4*>(k_cache + off);
                vv = *reinterpret_cast<const uint4*>(v_cache + off);
            }
            *reinterpret_cast<uint4*>(k_s + j * ROW + d) = kv;
            *reinterpret_cast<uint4*>(v_s + j * ROW + d) = vv;
        }
        __syncthreads();

        // Scores of this lane's key against the warp's 4 rows.
        float s[kRowsPerWarp];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) s[r] = 0.f;
        const T* krow = k_s + lane * ROW;
#pragma unroll 4
        for (int d = 0; d < D; d += VEC) {
            float kf[VEC];
            load_floats<T, VEC>(krow + d, kf);
#pragma unroll
            for (int r = 0; r < kRowsPerWarp; ++r) {
                const float* qr = q_s + (warp * kRowsPerWarp + r) * D + d;
#pragma unroll
                for (int i = 0; i < VEC; i += 4) {
                    const float4 qv = *reinterpret_cast<const float4*>(qr + i);
                    s[r] += qv.x * kf[i] + qv.y * kf[i + 1] + qv.z * kf[i + 2] + qv.w * kf[i + 3];
                }
            }
        }

        // Mask, then the online-softmax update. Tree tiles start at L + 32k, so the tile's mask
        // bits are exactly word k of each row and bit `lane` is this lane's key.
        const int key = t0 + lane;
        float p[kRowsPerWarp];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
            bool ok = row_ok[r] && key < kend;
            if (is_tree && ok) {
                const unsigned int word =
                    mask_bits[(static_cast<long long>(b) * n_max + node[r]) * mask_words +
                              ((t0 - kbeg) >> 5)];
                ok = (word >> lane) & 1u;
            }
            const float sr = ok ? s[r] : neg_inf();
            const float m_new = fmaxf(m[r], warp_max(sr));
            const float m_use = (m_new == neg_inf()) ? 0.f : m_new;  // nothing visible yet
            const float alpha = exp2f(m[r] - m_use);                 // 0 when m was -inf
            p[r] = exp2f(sr - m_use);                                 // 0 for masked keys
            l[r] = l[r] * alpha + p[r];
#pragma unroll
            for (int i = 0; i < DPL; ++i) acc[r][i] *= alpha;
            m[r] = m_new;
        }
        *reinterpret_cast<float4*>(&p_s[warp][lane][0]) = make_float4(p[0], p[1], p[2], p[3]);
        __syncwarp();

        // acc += P @ V: lane owns DPL output dims; key j's weights are read back from p_s.
        const int nkeys = imin(kKeyTile, kend - t0);
        for (int j = 0; j < nkeys; ++j) {
            float vf[DPL];
            load_floats<T, DPL>(v_s + j * ROW + lane * DPL, vf);
            const float4 pj = *reinterpret_cast<const float4*>(&p_s[warp][j][0]);
#pragma unroll
            for (int i = 0; i < DPL; ++i) {
                acc[0][i] += pj.x * vf[i];
                acc[1][i] += pj.y * vf[i];
                acc[2][i] += pj.z * vf[i];
                acc[3][i] += pj.w * vf[i];
            }
        }
    }

#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
        const float lsum = warp_sum(l[r]);  // every lane, before the per-row exit
        if (!row_ok[r]) continue;           // uniform over the warp
        const int row = row0 + warp * kRowsPerWarp + r;
        const int n = row / group;
        const int h = kvh * group + row % group;
        const long long idx =
            ((static_cast<long long>(b) * hq + h) * n_max + n) * s_tot + split;
        // lsum == 0: every key of the range masked for this row (only possible in the tree part
        // with a mask row lacking its diagonal). Such a segment is empty: weight 0 in the merge.
        const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
        float o[DPL];
#pragma unroll
        for (int i = 0; i < DPL; ++i) o[i] = acc[r][i] * inv;
        store_floats<float, DPL>(o_part + idx * D + lane * DPL, o);
        if (lane == 0) lse_part[idx] = lsum > 0.f ? m[r] + log2f(lsum) : neg_inf();
    }
}

// grid = (ceil(Nmax * Hq / kWarps), B), block = kThreads; one warp per output row (b, n, h),
// h fastest so consecutive warps write adjacent memory. Padding rows get zeros.
template <typename T, int D>
__device__ __forceinline__ void tree_attn_merge(
    const float* __restrict__ o_part, const float* __restrict__ lse_part, T* __restrict__ out,
    const int* __restrict__ slots, const int* __restrict__ prefix_lens,
    const int* __restrict__ num_nodes, int num_slots, int hq, int max_len, int n_max, int chunk,
    int num_prefix_splits) {
    constexpr int DPL = D / 32;
    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int b = blockIdx.y;
    const int item = blockIdx.x * kWarps + warp;
    if (item >= n_max * hq) return;  // whole warps only; no barrier in this kernel
    const int n = item / hq;
    const int h = item % hq;

    const SeqGeom g = seq_geom(b, slots, prefix_lens, num_nodes, num_slots, max_len, n_max);
    float o[DPL];
#pragma unroll
    for (int i = 0; i < DPL; ++i) o[i] = 0.f;
    if (n < g.N) {
        const int s_tot = num_prefix_splits + 1;
        // Prefix splits that ran: those with split * chunk < L (the last one runs to L).
        const int n_prefix = g.L > 0 ? imin((g.L + chunk - 1) / chunk, num_prefix_splits) : 0;
        const long long base = ((static_cast<long long>(b) * hq + h) * n_max + n) * s_tot;
        float mx = lse_part[base + num_prefix_splits];
        for (int s = 0; s < n_prefix; ++s) mx = fmaxf(mx, lse_part[base + s]);
        if (mx != neg_inf()) {  // both parts empty (mask row without its diagonal, L = 0): zeros
            float wsum = 0.f;
            for (int i = 0; i <= n_prefix; ++i) {
                const int s = (i == n_prefix) ? num_prefix_splits : i;
                const float lse = lse_part[base + s];
                if (lse == neg_inf()) continue;  // empty segment: weight 0, its o_part unwritten
                const float w = exp2f(lse - mx);
                float of[DPL];
                load_floats<float, DPL>(o_part + (base + s) * D + lane * DPL, of);
#pragma unroll
                for (int d = 0; d < DPL; ++d) o[d] += w * of[d];
                wsum += w;
            }
            const float inv = 1.f / wsum;  // >= 1: the largest segment has weight 1
#pragma unroll
            for (int d = 0; d < DPL; ++d) o[d] *= inv;
        }
    }
    store_floats<T, DPL>(out + ((static_cast<long long>(b) * n_max + n) * hq + h) * D + lane * DPL,
                         o);
}

}  // namespace hedgerow_tree_attn

// Kernel entry points: hedgerow_tree_attn_{partial,merge}_{f16,bf16,f32}_d{64,128}.
#define HEDGEROW_TREE_ATTN_KERNELS(T, TNAME, D)                                                  \
    extern "C" __global__ void __launch_bounds__(hedgerow_tree_attn::kThreads)                    \
        hedgerow_tree_attn_partial_##TNAME##_d##D(                                                \
            const T* q, long long q_sb, long long q_sh, long long q_sn, const T* k_cache,         \
            const T* v_cache, const int* slots, const int* prefix_lens, const int* num_nodes,     \
            const unsigned int* mask_bits, float* o_part, float* lse_part, int num_slots, int hq, \
            int hkv, int max_len, int n_max, int mask_words, int chunk, int num_prefix_splits,    \
            float scale_log2) {                                                                   \
        hedgerow_tree_attn::tree_attn_partial<T, D>(                                              \
            q, q_sb, q_sh, q_sn, k_cache, v_cache, slots, prefix_lens, num_nodes, mask_bits,      \
            o_part, lse_part, num_slots, hq, hkv, max_len, n_max, mask_words, chunk,              \
            num_prefix_splits, scale_log2);                                                       \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(hedgerow_tree_attn::kThreads)                    \
        hedgerow_tree_attn_merge_##TNAME##_d##D(                                                  \
            const float* o_part, const float* lse_part, T* out, const int* slots,                 \
            const int* prefix_lens, const int* num_nodes, int num_slots, int hq, int max_len,     \
            int n_max, int chunk, int num_prefix_splits) {                                        \
        hedgerow_tree_attn::tree_attn_merge<T, D>(o_part, lse_part, out, slots, prefix_lens,      \
                                                  num_nodes, num_slots, hq, max_len, n_max,       \
                                                  chunk, num_prefix_splits);                      \
    }

HEDGEROW_TREE_ATTN_KERNELS(hedgerow_tree_attn::f16, f16, 64)
HEDGEROW_TREE_ATTN_KERNELS(hedgerow_tree_attn::f16, f16, 128)
HEDGEROW_TREE_ATTN_KERNELS(hedgerow_tree_attn::bf16, bf16, 64)
HEDGEROW_TREE_ATTN_KERNELS(hedgerow_tree_attn::bf16, bf16, 128)
HEDGEROW_TREE_ATTN_KERNELS(float, f32, 64)
HEDGEROW_TREE_ATTN_KERNELS(float, f32, 128)
