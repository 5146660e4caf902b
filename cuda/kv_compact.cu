// KV compaction after acceptance (algorithms.md §3), every layer in one launch.
//
// For each sequence b: copy cache rows src_rows[b, j] -> dst_start[b] + j for j < counts[b], in
// slot slots[b], for every kv head and every cache tensor (all layers' K and V).
//
// Layouts (elements):
//   tensor_ptrs  uint64 [T]: base address of each cache tensor, T = 2 * layers (the binding puts
//                every layer's K first, then every layer's V; the kernel does not care). Every
//                tensor is a contiguous [num_slots, Hkv, max_len, D] cache of the same shape and
//                dtype; a row is row_units 16-byte units (D * sizeof(dtype) / 16).
//   slots, dst_start, counts  int32 [B]
//   src_rows     int32 [B, max_count], absolute row indices inside the slot.
// grid = (B, Hkv, T), block = kThreads. Blocks touch disjoint memory when slots are distinct.
//
// Overlap. Sources and destinations share rows (src_rows[b, j] >= dst_start[b] + j, src_rows
// strictly increasing: the accepted path, in order). Rows are copied in chunks of up to
// kUnits / row_units rows; every read of a chunk happens before the barrier and every write after
// it, so a chunk never sees its own writes. A later chunk reads rows src[j'] >= dst_start + j',
// which lie above every row an earlier chunk wrote (< dst_start + j'), so nothing it reads has
// been overwritten. Under the precondition the copy therefore equals "gather all, then scatter".
// When count <= rows per chunk (64 rows of a 16-bit head of 128; the usual accepted path) the copy
// is one chunk and is exact for ANY src/dst overlap. Rows that are already in place
// (src == dst, e.g. a chain's accepted prefix) are neither read nor written. Out-of-range rows
// (outside [0, max_len)) and invalid slots are skipped, never touched.
//
// With HEDGEROW_HOST_EMULATION defined this compiles as host C++ for the CPU emulation tests.

namespace hedgerow_kv {
constexpr int kThreads = 256;      // verify/cuda_kernels.py launches with this block size
constexpr int kUnitsPerThread = 4;  // 16-byte units each thread holds per chunk
constexpr int kUnits = kThreads * kUnitsPerThread;
}  // namespace hedgerow_kv

extern "C" __global__ void __launch_bounds__(hedgerow_kv::kThreads)
    hedgerow_kv_compact(const unsigned long long* __restrict__ tensor_ptrs,
                        const int* __restrict__ slots, const int* __restrict__ src_rows,
                        const int* __restrict__ dst_start, const int* __restrict__ counts,
                        int max_count, int num_slots, int hkv, int max_len, int row_units) {
    using namespace hedgerow_kv;
    const int b = blockIdx.x;
    const int h = blockIdx.y;
    const int t = blockIdx.z;
    const int slot = slots[b];
    const int count = counts[b] < max_count ? counts[b] : max_count;
    const int d0 = dst_start[b];
    if (slot < 0 || slot >= num_slots || count <= 0) return;  // uniform over the block

    uint4* base = reinterpret_cast<uint4*>(tensor_ptrs[t]) +
                  (static_cast<long long>(slot) * hkv + h) * max_len * row_units;
    const int rows_per_chunk = row_units < kUnits ? kUnits / row_units : 1;
    const int* src = src_rows + static_cast<long long>(b) * max_count;

    for (int j0 = 0; j0 < count; j0 += rows_per_chunk) {
        uint4 buf[kUnitsPerThread];
        long long dst_off[kUnitsPerThread];  // -1: nothing to write
#pragma unroll
        for (int i = 0; i < kUnitsPerThread; ++i) {
            const int u = threadIdx.x + i * kThreads;
            const int r = u / row_units;
            const int c = u % row_units;
            const int j = j0 + r;
            dst_off[i] = -1;
            if (r < rows_per_chunk && j < count) {
                const int s = src[j];
                const int d = d0 + j;
                if (s != d && s >= 0 && s < max_len && d >= 0 && d < max_len) {
                    buf[i] = base[static_cast<long long>(s) * row_units + c];
                    dst_off[i] = static_cast<long long>(d) * row_units + c;
                }
            }
        }
        __syncthreads();  // all reads of this chunk before any write of it
#pragma unroll
        for (int i = 0; i < kUnitsPerThread; ++i) {
            if (dst_off[i] >= 0) base[dst_off[i]] = buf[i];
        }
    }
}
