// The one schema file of fastprune._C: every native op is declared here, once, and implemented per
// device by TORCH_LIBRARY_IMPL blocks in csrc/<family>.cpp (CPU) and csrc/cuda/<family>.cu (CUDA).
//
// These are the native *kernels*. The public ops (fastprune::pgd_step, ...) are torch.library
// custom ops defined in fastprune/ops/, which choose a backend (reference, triton, cpp, cuda) and
// call these for the cpp and cuda backends.
#include <Python.h>
#include <torch/library.h>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {
void set_thread_intra_op_threads(int64_t threads) {
  TORCH_CHECK(threads >= 1, "set_thread_intra_op_threads_ext: threads must be at least 1, got ", threads);
#ifdef _OPENMP
  omp_set_num_threads(static_cast<int>(threads));
#endif
}
}  // namespace

namespace fastprune {
namespace sparse_cpu {
int64_t release_pooled_memory();  // csrc/sparse/memory_pool.cpp
bool generated_supported();       // csrc/sparse/generated.cpp
}  // namespace sparse_cpu
}  // namespace fastprune

TORCH_LIBRARY(fastprune, m) {
  // One projected-gradient step written into `out` (which may alias x_adv for the in-place form).
  // alpha and eps are float32 tensors of shape (N,), one value per sample; norm is "linf" or "l2".
  m.def(
      "pgd_step_ext(Tensor x_adv, Tensor grad, Tensor x_nat, Tensor alpha, Tensor eps, str norm, "
      "float clip_min, float clip_max, Tensor(a!) out) -> ()");

  // Gaussian Gram matrix of the rows of x (m, d): K_ij = exp(-scale |x_i - x_j|^2), float32 (m, m),
  // computed on rows centred by `mean` (d,); scale is a 0-dim float32 tensor (no host sync). With
  // apply_exp false it returns the squared distances instead.
  m.def("gaussian_gram_ext(Tensor x, Tensor mean, Tensor scale, bool apply_exp) -> Tensor");
  // dL/dx (m, d) from grad = dL/dK (m, m) and the forward's K: 2 scale (S x - diag(S 1) x), S = (G + G^T) * K.
  m.def("gaussian_gram_backward_ext(Tensor grad, Tensor k, Tensor x, Tensor mean, Tensor scale) -> Tensor");

  // Sparse convolution (N, C, H, W) -> (N, out_channels, H', W') with a CSR weight: row_ptr (OC + 1)
  // and col_idx (nnz) int32, col = (ic * kh + r) * kw + s, values (nnz) float32; groups 1, dilation 1.
  // algo: 0 picks by shape, 1 the padded channel-major algorithm, 2 the direct one (stride 1 or 2,
  // NCHW), 3 the batch-innermost one, 4 the tiled one, 5 the generated one (machine code per layer;
  // the tiled one where it does not apply); 3-5 lay their output out (OC, H', W', N). (CPU; the GPU
  // runs sparse_conv2d_tiled_ext below.)
  // epilogue: 0 none, 1 ReLU, 2 ReLU then 2x2 max pooling (CPU only), 3 ReLU of the sum with
  // `residual` (the output's shape; CPU algorithms 3-5 only): fused into the
  // write of the output, which saves whole passes over the activations.
  m.def(
      "sparse_conv2d_ext(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, Tensor? bias, int kh, int kw, "
      "int stride_h, int stride_w, int pad_h, int pad_w, int algo, int epilogue, Tensor? residual=None) -> Tensor");
  // The same convolution with ReLU then 2x2 max pooling fused (epilogue 2), returning also each
  // pooled output's window position (uint8, the output's sizes and strides; 2 dy + dx of the first
  // maximum) for the backward pass. (CPU.)
  m.def(
      "sparse_conv2d_pool_ext(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, Tensor? bias, int kh, "
      "int kw, int stride_h, int stride_w, int pad_h, int pad_w, int algo) -> (Tensor, Tensor)");
  // The gradient w.r.t. the CSR values of that convolution (the pattern frozen): (nnz,) float32, from
  // its input x and the gradient of its (un-fused) output. (CPU.)
  m.def(
      "sparse_conv2d_weight_grad_ext(Tensor x, Tensor grad, Tensor row_ptr, Tensor col_idx, int kh, int kw, "
      "int stride_h, int stride_w, int pad_h, int pad_w) -> Tensor");
  // Sparse linear (N, in) -> (N, out) with a CSR weight (out x in). (CPU.)
  m.def("sparse_linear_ext(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, Tensor? bias) -> Tensor");
  // The GPU form of both (CUDA): a convolution (N, C, H, W) -> (N, oc, H', W') contiguous, with the
  // weight in the output-channel-tiled format of fastprune/reference/sparse.py (TiledWeight): tile_ptr
  // (tiles + 1) and tile_cols int32, tile_vals (columns, 16) and bias (tiles * 16) float32; ReLU
  // optionally fused. Sparse linear runs as a 1x1 convolution of a 1x1 map.
  m.def(
      "sparse_conv2d_tiled_ext(Tensor x, Tensor tile_ptr, Tensor tile_cols, Tensor tile_vals, Tensor bias, int oc, "
      "int kh, int kw, int stride_h, int stride_w, int pad_h, int pad_w, bool relu) -> Tensor");
  // Free the memory the CPU sparse kernels keep for reuse (outputs of tensors that died); returns the
  // bytes freed. (Any device: no tensor argument.)
  m.def("sparse_release_memory_ext() -> int", &fastprune::sparse_cpu::release_pooled_memory);
  // Whether the CPU sparse conv's generated algorithm (5) runs here: AVX-512 on x86-64 and memory the
  // system lets it make executable. (Any device.)
  m.def("sparse_generated_supported_ext() -> bool", &fastprune::sparse_cpu::generated_supported);
  // How many OpenMP threads the calling thread's parallel regions start (its own setting: other
  // threads keep theirs; torch.set_num_threads would also reset process-wide pools and caches).
  // SparseModel's workers, each running whole micro-batches, take 1. (Any device.)
  m.def("set_thread_intra_op_threads_ext(int threads) -> ()", &set_thread_intra_op_threads);
}

// `import fastprune._C` only needs to load the library (its static initialisers register the ops);
// this empty module makes the shared object importable as a Python extension.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
