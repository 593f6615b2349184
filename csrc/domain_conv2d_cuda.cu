// fastmdl::domain_conv2d_cuda -- the fused mixed-domain convolution on CUDA GPUs.
//
// For sample n of domain d and output channel c:
//   y[n, c] = conv(x[n, in_d], W[c, in_d]) * scale[d, c] + shift[d, c]   if c in out_d
//           = 0                                                          otherwise
// then + residual (every channel), then ReLU (NaN kept, as torch.relu does).
//
// One implicit-GEMM kernel launch computes the whole mixed batch, with the same
// grouping as the Triton kernel (kernels/domain_conv2d.py). Samples are grouped by
// domain (a stable sort of `domain` on the device), and every block computes a
// BM x BN tile of ONE domain d's GEMM:
//
//   rows  m : output pixels of d's samples            (M_d = n_d * H_out * W_out)
//   cols  j : d's column order: its filters first (ascending), then the others
//   K       : (tap r, s) x d's input channels         (K_d = kh * kw * |in_d|)
//
// Why this shape:
// - Tiles never straddle two domains, so a block reads only its domain's channels
//   and weights, and the gather happens inside the operand loads
//   (x[n, in_idx[k], ih, iw] and W[co, in_idx[k], r, s] straight into shared
//   memory): no gathered copy of x or of the weight ever exists.
// - The column order puts d's filters first, so a column block past |out_d| holds
//   only channels d does not use: it skips the K loop and writes zeros (plus the
//   residual). Every output element is written exactly once, with no memset.
// - K is flattened over (tap, channel) rather than cut per tap, so a domain with
//   an odd channel count (pruned networks have them everywhere) wastes at most
//   one partial K step, not one per tap. The decoding of k into offsets is done
//   once per step for the whole block, one step ahead, in a small shared table.
// - The grid is an upper bound computed from N and D alone (each domain wastes at
//   most one partial row tile); blocks past a domain's tiles return at once. So the
//   host never reads a device value: no synchronisation, and the op can be
//   captured in a CUDA graph. The only other device work is the sort and one
//   searchsorted (the first sample of each domain); each block finds its domain
//   by walking those D + 1 offsets, and the channel of each of its columns by a
//   binary search in out_index (no column-order table is materialised).
// - float16 and bfloat16 run on tensor cores (nvcuda::wmma 16x16x16, float
//   accumulators). float32 runs on tensor cores in TF32 when torch allows TF32
//   for cuDNN convolutions (torch.backends.cudnn.allow_tf32, the default, which is
//   what the Triton backend follows too), otherwise with plain float FMAs. The
//   epilogue (scale, shift, zeros, residual, ReLU) runs in float from a shared
//   float tile, so it is the same code for every path.
// - Global loads for step t + 1 are issued into registers before the tensor-core
//   work of step t, and the operand tiles are double-buffered, so each K step
//   costs one __syncthreads.
//
// Tiles: BM = 64 pixels x BN = 64 columns x BK = 32 k per step, 128 threads
// (4 warps of 32 x 32). Loads of x follow its layout: along pixels for NCHW,
// along channels for channels_last; any other strides work too, just slower.
//
// The index values (domain ids in [0, D), index lists sorted, unique and in
// range, offsets consistent) are NOT checked here: reading them would need a
// device-to-host copy. The Python front end fastmdl.ops.domain_conv2d checks them
// in one transfer before it calls the op; callers of this op directly must pass
// valid lists. Shapes, dtypes and devices are checked.

// CPU-only torch wheels ship the c10/cuda headers without this generated file (it
// only sets Windows export macros), so the kernel still compiles against them.
#if !__has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#define C10_CUDA_NO_CMAKE_CONFIGURE_FILE
#endif

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <climits>
#include <cstdint>
#include <type_traits>

// wmma with bfloat16 and TF32 needs sm_80 (mma.h declares them under the same
// test, which also holds in the host pass). Older targets get the FMA path for
// every dtype.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define FASTMDL_TENSOR_CORES 1
#else
#define FASTMDL_TENSOR_CORES 0
#endif

namespace fastmdl {
namespace {

constexpr int BM = 64, BN = 64, BK = 32, kThreads = 128;
constexpr int kFarAway = -(1 << 30);  // an ih that fails every bounds check

// Shared-memory row pitches, padded by 16 bytes against bank conflicts (and kept
// multiples of 16 bytes, as wmma wants).
template <typename T> constexpr int lda() { return BM + 16 / int(sizeof(T)); }
template <typename T> constexpr int ldb() { return BN + 16 / int(sizeof(T)); }
constexpr int LDC = BM + 4;

template <typename T>
struct Params {
  const T* x;
  const T* w;
  T* y;
  const T* scale;     // (D, C_out) or null
  const T* shift;     // (D, C_out) or null
  const T* residual;  // output's shape or null
  const int64_t* in_index;
  const int64_t* in_offsets;
  const int64_t* out_index;
  const int64_t* out_offsets;
  const int64_t* order;         // samples grouped by domain (stable)
  const int64_t* sample_start;  // (D + 1): where each domain's samples start in order
  int D, C_out, H, W, Ho, Wo, KH, KW;
  int stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t sx[4], sw[4], sy[4], sr[4];  // strides of x, weight, y, residual
  bool relu;
};

// The channel of column `col` in domain d's column order: its filters (the sorted
// list L = out_index[out_offsets[d]:...]) first, then the channels not in L.
// The j-th channel not in L is j + #{i : L[i] - i <= j}, as L[i] - i (the number
// of channels missing below L[i]) never decreases.
__device__ int column_channel(const int64_t* L, int n_out, int C_out, int col) {
  if (col >= C_out) return -1;
  if (col < n_out) return static_cast<int>(L[col]);
  const int j = col - n_out;
  int lo = 0, hi = n_out;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (L[mid] - mid <= j) lo = mid + 1; else hi = mid;
  }
  return j + lo;
}

// ---- the block's 64 x 64 product, two ways; both leave it in a float tile c[col][row]

// Plain float FMAs: thread (tm, tn) owns rows tm*8 .. +8 and columns tn*4 .. +4.
template <typename T>
struct FmaTile {
  float acc[8][4];

  __device__ void zero() {
#pragma unroll
    for (int r = 0; r < 8; ++r)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[r][q] = 0.f;
  }
  __device__ void multiply(const T* a, const T* b) {  // a[k][m], b[k][n]
    const int tm = threadIdx.x / 16, tn = threadIdx.x % 16;
#pragma unroll 4
    for (int k = 0; k < BK; ++k) {
      float av[8], bv[4];
#pragma unroll
      for (int r = 0; r < 8; ++r) av[r] = static_cast<float>(a[k * lda<T>() + tm * 8 + r]);
#pragma unroll
      for (int q = 0; q < 4; ++q) bv[q] = static_cast<float>(b[k * ldb<T>() + tn * 4 + q]);
#pragma unroll
      for (int r = 0; r < 8; ++r)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[r][q] = fmaf(av[r], bv[q], acc[r][q]);
    }
  }
  __device__ void store(float* c) const {
    const int tm = threadIdx.x / 16, tn = threadIdx.x % 16;
#pragma unroll
    for (int r = 0; r < 8; ++r)
#pragma unroll
      for (int q = 0; q < 4; ++q) c[(tn * 4 + q) * LDC + tm * 8 + r] = acc[r][q];
  }
};

#if FASTMDL_TENSOR_CORES
namespace wmma = nvcuda::wmma;

// The wmma element type, the type it is loaded from, and the K of one mma.
template <typename T> struct WmmaOf;
template <> struct WmmaOf<c10::Half> { using elem = __half; using mem = __half; static constexpr int k = 16; };
template <> struct WmmaOf<c10::BFloat16> { using elem = __nv_bfloat16; using mem = __nv_bfloat16; static constexpr int k = 16; };
template <> struct WmmaOf<float> { using elem = wmma::precision::tf32; using mem = float; static constexpr int k = 8; };

// Tensor cores: warp (wm, wn) owns the 32 x 32 sub-tile at rows wm*32, columns wn*32.
template <typename T>
struct TensorCoreTile {
  using Op = WmmaOf<T>;
  wmma::fragment<wmma::accumulator, 16, 16, Op::k, float> acc[2][2];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }
  __device__ void multiply(const T* a, const T* b) {  // a[k][m] is A col-major, b[k][n] row-major
    const int warp = threadIdx.x / 32, wm = warp % 2, wn = warp / 2;
    const auto* am = reinterpret_cast<const typename Op::mem*>(a);
    const auto* bm = reinterpret_cast<const typename Op::mem*>(b);
#pragma unroll
    for (int k = 0; k < BK; k += Op::k) {
      wmma::fragment<wmma::matrix_a, 16, 16, Op::k, typename Op::elem, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, Op::k, typename Op::elem, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        wmma::load_matrix_sync(fa[i], am + k * lda<T>() + wm * 32 + i * 16, lda<T>());
        wmma::load_matrix_sync(fb[i], bm + k * ldb<T>() + wn * 32 + i * 16, ldb<T>());
        if constexpr (std::is_same_v<T, float>) {  // round float to TF32 on the way in
#pragma unroll
          for (int e = 0; e < fa[i].num_elements; ++e) fa[i].x[e] = wmma::__float_to_tf32(fa[i].x[e]);
#pragma unroll
          for (int e = 0; e < fb[i].num_elements; ++e) fb[i].x[e] = wmma::__float_to_tf32(fb[i].x[e]);
        }
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  __device__ void store(float* c) const {
    const int warp = threadIdx.x / 32, wm = warp % 2, wn = warp / 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(c + (wn * 32 + j * 16) * LDC + wm * 32 + i * 16, acc[i][j], LDC,
                                wmma::mem_col_major);
  }
};
#endif

template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(kThreads) domain_conv2d_kernel(const Params<T> p) {
#if FASTMDL_TENSOR_CORES
  using Tile = std::conditional_t<kTensorCores, TensorCoreTile<T>, FmaTile<T>>;
#else
  using Tile = FmaTile<T>;
#endif
  const int tid = threadIdx.x;
  const int64_t hw = int64_t(p.Ho) * p.Wo;

  // Which domain this row tile belongs to: domains own consecutive runs of tiles.
  int d = 0;
  int64_t first_tile = 0;
  for (; d < p.D; ++d) {
    const int64_t tiles = ((p.sample_start[d + 1] - p.sample_start[d]) * hw + BM - 1) / BM;
    if (blockIdx.x < first_tile + tiles) break;
    first_tile += tiles;
  }
  if (d == p.D) return;  // past the last tile: the grid is an upper bound
  const int64_t m0 = (int64_t(blockIdx.x) - first_tile) * BM;
  const int64_t s0 = p.sample_start[d];
  const int64_t m_d = (p.sample_start[d + 1] - s0) * hw;
  const int col0 = blockIdx.y * BN;
  const int64_t in_begin = p.in_offsets[d], out_begin = p.out_offsets[d];
  const int n_in = static_cast<int>(p.in_offsets[d + 1] - in_begin);
  const int n_out = static_cast<int>(p.out_offsets[d + 1] - out_begin);
  const bool has_filters = col0 < n_out;  // else every column here is one d does not use

  // Shared memory: two buffers of operand tiles, later reused for the float result.
  constexpr int kOperandBytes = 2 * BK * (lda<T>() + ldb<T>()) * int(sizeof(T));
  constexpr int kResultBytes = BN * LDC * int(sizeof(float));
  alignas(128) __shared__ unsigned char smem[kOperandBytes > kResultBytes ? kOperandBytes : kResultBytes];
  T* const a_buf = reinterpret_cast<T*>(smem);                // [2][BK][lda]
  T* const b_buf = a_buf + 2 * BK * lda<T>();                  // [2][BK][ldb]
  float* const c_tile = reinterpret_cast<float*>(smem);       // [BN][LDC]

  __shared__ int64_t row_x[BM], row_y[BM], row_r[BM];  // per-pixel offsets into x, y, residual
  __shared__ int row_ih[BM], row_iw[BM];               // top-left input coordinate of the window
  __shared__ int col_c[BN];                            // output channel of each column, -1 past C_out
  __shared__ int64_t col_w[BN];                        // its offset into the weight
  __shared__ int64_t k_x[2][BK], k_w[2][BK];           // offsets of step k into x and W (-1: none)
  __shared__ int k_dy[2][BK], k_dx[2][BK];             // its tap's displacement

  for (int i = tid; i < BM; i += kThreads) {
    const int64_t row = m0 + i;
    if (row < m_d) {
      const int64_t n = p.order[s0 + row / hw];
      const int oh = static_cast<int>((row % hw) / p.Wo), ow = static_cast<int>(row % p.Wo);
      const int ih = oh * p.stride_h - p.pad_h, iw = ow * p.stride_w - p.pad_w;
      row_ih[i] = ih;
      row_iw[i] = iw;
      row_x[i] = n * p.sx[0] + int64_t(ih) * p.sx[2] + int64_t(iw) * p.sx[3];
      row_y[i] = n * p.sy[0] + oh * p.sy[2] + ow * p.sy[3];
      row_r[i] = n * p.sr[0] + oh * p.sr[2] + ow * p.sr[3];
    } else {
      row_ih[i] = kFarAway;
      row_iw[i] = 0;
      row_x[i] = 0;
      row_y[i] = -1;
      row_r[i] = 0;
    }
  }
  for (int j = tid; j < BN; j += kThreads) {
    const int c = column_channel(p.out_index + out_begin, n_out, p.C_out, col0 + j);
    col_c[j] = c;
    col_w[j] = c < 0 ? 0 : c * p.sw[0];
  }

  Tile tile;
  tile.zero();
  if (has_filters) {
    const int K = n_in * p.KH * p.KW;
    const int steps = (K + BK - 1) / BK;

    // Entry `slot` of the k table for step t: k = t * BK + tid, decoded tap-major.
    auto decode_k = [&](int t, int slot) {
      if (tid >= BK) return;
      const int k = t * BK + tid;
      if (k < K) {
        const int tap = k / n_in, c = k - tap * n_in;
        const int r = tap / p.KW, s = tap - r * p.KW;
        const int64_t ci = p.in_index[in_begin + c];
        k_dy[slot][tid] = r * p.dil_h;
        k_dx[slot][tid] = s * p.dil_w;
        k_x[slot][tid] = ci * p.sx[1] + int64_t(r) * p.dil_h * p.sx[2] +
                         int64_t(s) * p.dil_w * p.sx[3];
        k_w[slot][tid] = ci * p.sw[1] + r * p.sw[2] + s * p.sw[3];
      } else {
        k_dy[slot][tid] = kFarAway;
        k_dx[slot][tid] = 0;
        k_x[slot][tid] = 0;
        k_w[slot][tid] = -1;
      }
    };

    // Which (row, k) element e of the A tile this thread loads: along channels when
    // they are adjacent in memory (channels_last), along pixels otherwise.
    constexpr int kPer = BM * BK / kThreads;  // elements per thread, A and B alike
    static_assert(BK * BN / kThreads == kPer, "A and B tiles must split evenly");
    const bool channels_inner = p.sx[1] == 1;
    const int a_m = channels_inner ? tid / BK : tid % BM;
    const int a_k = channels_inner ? tid % BK : tid / BM;
    const int a_dm = channels_inner ? kThreads / BK : 0;
    const int a_dk = channels_inner ? 0 : kThreads / BM;
    const int b_k = tid % BK, b_j = tid / BK;  // B: along k, then columns

    T ra[kPer], rb[kPer];
    const T zero = static_cast<T>(0.f);
    auto fetch = [&](int slot) {  // global -> registers, with the gather and bounds
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        const int m = a_m + e * a_dm, k = a_k + e * a_dk;
        const int ih = row_ih[m] + k_dy[slot][k], iw = row_iw[m] + k_dx[slot][k];
        ra[e] = (unsigned(ih) < unsigned(p.H) && unsigned(iw) < unsigned(p.W))
                    ? p.x[row_x[m] + k_x[slot][k]] : zero;
      }
      const int64_t kw = k_w[slot][b_k];
#pragma unroll
      for (int e = 0; e < kPer; ++e) {
        const int j = b_j + e * (kThreads / BK);
        rb[e] = (kw >= 0 && col0 + j < n_out) ? p.w[col_w[j] + kw] : zero;
      }
    };
    auto stash = [&](int buf) {  // registers -> shared buffer `buf`
      T* a = a_buf + buf * BK * lda<T>();
      T* b = b_buf + buf * BK * ldb<T>();
#pragma unroll
      for (int e = 0; e < kPer; ++e) a[(a_k + e * a_dk) * lda<T>() + a_m + e * a_dm] = ra[e];
#pragma unroll
      for (int e = 0; e < kPer; ++e) b[b_k * ldb<T>() + b_j + e * (kThreads / BK)] = rb[e];
    };

    // Pipeline: the k table runs two steps ahead, the global loads one step ahead.
    // Slot/buffer t & 1 is rewritten only after the barrier that follows its last
    // reader, so one __syncthreads per step suffices.
    decode_k(0, 0);
    __syncthreads();  // also publishes the row and column tables
    if (steps > 0) fetch(0);
    decode_k(1, 1);
    for (int t = 0; t < steps; ++t) {
      stash(t & 1);
      __syncthreads();
      if (t + 1 < steps) fetch((t + 1) & 1);
      if (t + 2 < steps) decode_k(t + 2, t & 1);
      tile.multiply(a_buf + (t & 1) * BK * lda<T>(), b_buf + (t & 1) * BK * ldb<T>());
    }
    __syncthreads();  // the operand buffers are dead: the float tile reuses them
    tile.store(c_tile);
  }
  __syncthreads();

  // Epilogue. Threads walk the tile along the output's contiguous dimension.
  const bool y_channels_inner = p.sy[1] == 1;
  for (int i = tid; i < BM * BN; i += kThreads) {
    const int m = y_channels_inner ? i / BN : i % BM;
    const int j = y_channels_inner ? i % BN : i / BM;
    const int c = col_c[j];
    if (row_y[m] < 0 || c < 0) continue;
    float v = 0.f;
    if (col0 + j < n_out) {
      v = c_tile[j * LDC + m];
      if (p.scale) v *= static_cast<float>(p.scale[int64_t(d) * p.C_out + c]);
      if (p.shift) v += static_cast<float>(p.shift[int64_t(d) * p.C_out + c]);
    }
    if (p.residual) v += static_cast<float>(p.residual[row_r[m] + c * p.sr[1]]);
    if (p.relu && !(v > 0.f) && v == v) v = 0.f;  // ReLU that keeps NaN
    p.y[row_y[m] + c * p.sy[1]] = static_cast<T>(v);
  }
}

template <typename T>
void launch(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& in_index,
            const at::Tensor& in_offsets, const at::Tensor& out_index,
            const at::Tensor& out_offsets, const at::Tensor& order,
            const at::Tensor& sample_start, const c10::optional<at::Tensor>& scale,
            const c10::optional<at::Tensor>& shift, const c10::optional<at::Tensor>& residual,
            bool relu, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
            at::Tensor& y, bool tensor_cores) {
  Params<T> p;
  p.x = x.data_ptr<T>();
  p.w = weight.data_ptr<T>();
  p.y = y.data_ptr<T>();
  p.scale = scale ? scale->data_ptr<T>() : nullptr;
  p.shift = shift ? shift->data_ptr<T>() : nullptr;
  p.residual = residual ? residual->data_ptr<T>() : nullptr;
  p.in_index = in_index.data_ptr<int64_t>();
  p.in_offsets = in_offsets.data_ptr<int64_t>();
  p.out_index = out_index.data_ptr<int64_t>();
  p.out_offsets = out_offsets.data_ptr<int64_t>();
  p.order = order.data_ptr<int64_t>();
  p.sample_start = sample_start.data_ptr<int64_t>();
  p.D = static_cast<int>(in_offsets.numel() - 1);
  p.C_out = static_cast<int>(weight.size(0));
  p.H = static_cast<int>(x.size(2));
  p.W = static_cast<int>(x.size(3));
  p.Ho = static_cast<int>(y.size(2));
  p.Wo = static_cast<int>(y.size(3));
  p.KH = static_cast<int>(weight.size(2));
  p.KW = static_cast<int>(weight.size(3));
  p.stride_h = static_cast<int>(stride[0]);
  p.stride_w = static_cast<int>(stride[1]);
  p.pad_h = static_cast<int>(padding[0]);
  p.pad_w = static_cast<int>(padding[1]);
  p.dil_h = static_cast<int>(dilation[0]);
  p.dil_w = static_cast<int>(dilation[1]);
  for (int i = 0; i < 4; ++i) {
    p.sx[i] = x.stride(i);
    p.sw[i] = weight.stride(i);
    p.sy[i] = y.stride(i);
    p.sr[i] = residual ? residual->stride(i) : 0;
  }
  p.relu = relu;

  // Upper bound on row tiles: sum over d of ceil(n_d * HW / BM) <= ceil(N * HW / BM) + D.
  const int64_t tiles = (x.size(0) * y.size(2) * y.size(3) + BM - 1) / BM + p.D;
  const int64_t col_blocks = (p.C_out + BN - 1) / BN;
  TORCH_CHECK(tiles <= INT_MAX && col_blocks <= 65535,
              "domain_conv2d_cuda: the problem is too large for one launch");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(col_blocks));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if constexpr (std::is_same_v<T, float>) {  // only float32 has a choice (TF32 or FMA)
    if (!tensor_cores) {
      domain_conv2d_kernel<T, false><<<grid, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
  }
  domain_conv2d_kernel<T, true><<<grid, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Same rule as the CPU kernel and the Python fake: channels_last output when x is
// densely channels_last (and not also plainly contiguous), contiguous otherwise.
at::MemoryFormat output_memory_format(const at::Tensor& x) {
  if (x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

at::Tensor domain_conv2d_cuda(const at::Tensor& x, const at::Tensor& weight,
                              const at::Tensor& domain, const at::Tensor& in_index,
                              const at::Tensor& in_offsets, const at::Tensor& out_index,
                              const at::Tensor& out_offsets,
                              const c10::optional<at::Tensor>& scale,
                              const c10::optional<at::Tensor>& shift,
                              const c10::optional<at::Tensor>& residual, bool relu,
                              at::IntArrayRef stride, at::IntArrayRef padding,
                              at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D (N, C_in, H, W)");
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1),
              "weight must be (C_out, C_in, kh, kw) with C_in = x.size(1)");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "stride, padding and dilation must have two entries");
  TORCH_CHECK(x.is_cuda(), "domain_conv2d_cuda takes CUDA tensors, got x on ", x.device());
  for (const at::Tensor* t : {&weight, &domain, &in_index, &in_offsets, &out_index, &out_offsets})
    TORCH_CHECK(t->device() == x.device(), "every tensor must be on x's device ", x.device());
  for (const at::Tensor* t : {&domain, &in_index, &in_offsets, &out_index, &out_offsets})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1, "index tensors must be 1-D int64");
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                       x.scalar_type() == at::kBFloat16,
                   "domain_conv2d_cuda takes float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_TYPE(weight.scalar_type() == x.scalar_type(), "weight must have x's dtype");

  const int64_t N = x.size(0), C_out = weight.size(0);
  for (int i = 0; i < 2; ++i)
    TORCH_CHECK(stride[i] > 0 && dilation[i] > 0 && padding[i] >= 0,
                "stride and dilation must be positive, padding non-negative");
  const int64_t Ho = (x.size(2) + 2 * padding[0] - dilation[0] * (weight.size(2) - 1) - 1) / stride[0] + 1;
  const int64_t Wo = (x.size(3) + 2 * padding[1] - dilation[1] * (weight.size(3) - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(Ho > 0 && Wo > 0, "the output would be empty: input too small for the kernel");
  TORCH_CHECK(domain.numel() == N, "domain must have one entry per sample");
  const int64_t D = in_offsets.numel() - 1;
  TORCH_CHECK(D >= 1, "in_offsets must have at least two entries");
  TORCH_CHECK(out_offsets.numel() == D + 1, "out_offsets must have D + 1 = ", D + 1, " entries");
  for (const c10::optional<at::Tensor>* t : {&scale, &shift}) {
    if (*t) {
      TORCH_CHECK((*t)->sizes() == at::IntArrayRef({D, C_out}) && (*t)->device() == x.device(),
                  "scale and shift must be (D, C_out) on x's device");
      TORCH_CHECK_TYPE((*t)->scalar_type() == x.scalar_type(), "scale and shift must have x's dtype");
    }
  }
  if (residual) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({N, C_out, Ho, Wo}) &&
                    residual->device() == x.device(),
                "residual must have the output's shape, on x's device");
    TORCH_CHECK_TYPE(residual->scalar_type() == x.scalar_type(), "residual must have x's dtype");
  }
  // The kernel indexes images with int: far beyond any real feature map.
  TORCH_CHECK(x.size(2) < (1 << 28) && x.size(3) < (1 << 28), "x is too large");

  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({N, C_out, Ho, Wo}, x.options().memory_format(output_memory_format(x)));
  if (N == 0) return y;

  // Samples grouped by domain, and where each domain's run starts: device ops only.
  const auto sorted = at::sort(domain, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor sample_start =
      at::searchsorted(std::get<0>(sorted), at::arange(D + 1, domain.options()));
  const at::Tensor order = std::get<1>(sorted);

  const c10::optional<at::Tensor> sc = scale ? c10::optional<at::Tensor>(scale->contiguous()) : c10::nullopt;
  const c10::optional<at::Tensor> sf = shift ? c10::optional<at::Tensor>(shift->contiguous()) : c10::nullopt;
  const at::Tensor ii = in_index.contiguous(), io = in_offsets.contiguous();
  const at::Tensor oi = out_index.contiguous(), oo = out_offsets.contiguous();

  // float32 takes TF32 tensor cores when torch allows them for convolutions.
  const bool tensor_cores = x.scalar_type() != at::kFloat || at::globalContext().allowTF32CuDNN();
  auto run = [&](auto zero) {  // `zero` only carries the element type
    launch<decltype(zero)>(x, weight, ii, io, oi, oo, order, sample_start, sc, sf, residual, relu,
                           stride, padding, dilation, y, tensor_cores);
  };
  switch (x.scalar_type()) {
    case at::kFloat: run(float()); break;
    case at::kHalf: run(c10::Half()); break;
    default: run(c10::BFloat16()); break;  // the dtype was checked above
  }
  return y;
}

}  // namespace

// The schema of the public op fastmdl::domain_conv2d lives in Python
// (fastmdl/_ops.py); this fragment adds the CUDA kernel as its own op, with the
// same schema as domain_conv2d_cpu, so it can be called, tested and traced alone.
TORCH_LIBRARY_FRAGMENT(fastmdl, m) {
  m.def(
      "domain_conv2d_cuda(Tensor x, Tensor weight, Tensor domain, Tensor in_index, "
      "Tensor in_offsets, Tensor out_index, Tensor out_offsets, Tensor? scale, "
      "Tensor? shift, Tensor? residual, bool relu, int[2] stride, int[2] padding, "
      "int[2] dilation) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastmdl, CUDA, m) {
  m.impl("domain_conv2d_cuda", &domain_conv2d_cuda);
}

}  // namespace fastmdl
