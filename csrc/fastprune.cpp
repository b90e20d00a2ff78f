// The one schema file of fastprune._C: every native op is declared here, once, and implemented per
// device by TORCH_LIBRARY_IMPL blocks in csrc/<family>.cpp (CPU) and csrc/cuda/<family>.cu (CUDA).
//
// These are the native *kernels*. The public ops (fastprune::pgd_step, ...) are torch.library
// custom ops defined in fastprune/ops/, which choose a backend (reference, triton, cpp, cuda) and
// call these for the cpp and cuda backends.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <optional>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastprune {
namespace sparse_cpu {
int64_t release_pooled_memory();  // csrc/sparse/memory_pool.cpp
bool generated_supported();       // csrc/sparse/generated.cpp
at::Tensor sparse_conv2d_cpu(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,  // conv.cpp
                             const at::Tensor& values, const std::optional<at::Tensor>& bias, int64_t kh, int64_t kw,
                             int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t algo,
                             int64_t epilogue, const std::optional<at::Tensor>& residual);
at::Tensor pooled_linear_cpu(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,  // linear.cpp
                             const at::Tensor& values, const std::optional<at::Tensor>& bias);
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
}

namespace {

// fastprune._C.run_team(callables) -> list: callables[i]() on thread i of one OpenMP team (thread 0
// is the caller), their results in order; the first exception raised is raised again here, after
// every thread has finished. Each thread's own parallel regions run on it alone (one thread), so a
// torch op inside runs serially on its thread.
//
// Why a team and not a Python thread pool: SparseModel runs its CPU micro-batches concurrently, one
// a thread, and may then run the rest of the network on the whole batch with every layer split over
// the threads. Split layers open OpenMP parallel regions on the calling thread, whose team threads
// then spin for milliseconds (libgomp's default wait policy) on the cores that pool threads would need
// for the next call's micro-batches (VGG16 at 90%, batch 64, Zen 4: 30-32 ms a call against 24-25 with
// OMP_WAIT_POLICY=passive; bench/NOTES.md, session 17). Running the micro-batches on that same team,
// no thread waits on a core another one needs.
PyObject* run_team(PyObject*, PyObject* arg) {
  PyObject* seq = PySequence_Fast(arg, "run_team: expected a sequence of callables");
  if (seq == nullptr) return nullptr;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
  PyObject** fns = PySequence_Fast_ITEMS(seq);
  for (Py_ssize_t i = 0; i < n; ++i)
    if (!PyCallable_Check(fns[i])) {
      Py_DECREF(seq);
      PyErr_Format(PyExc_TypeError, "run_team: item %zd is not callable", i);
      return nullptr;
    }
  std::vector<PyObject*> results(static_cast<size_t>(n), nullptr);
  PyObject *err_type = nullptr, *err_value = nullptr, *err_tb = nullptr;
  Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel num_threads(static_cast<int>(n > 0 ? n : 1))
#endif
  {
#ifdef _OPENMP
    // This thread's regions (the torch ops its callable runs): itself alone. ATen first sets a thread
    // it has not seen to the process's thread count (lazily, at its first op): that happens here, before.
    at::get_num_threads();
    omp_set_num_threads(1);
    const Py_ssize_t first = omp_get_thread_num(), step = omp_get_num_threads();
#else
    const Py_ssize_t first = 0, step = 1;
#endif
    for (Py_ssize_t i = first; i < n; i += step) {
      const PyGILState_STATE gil = PyGILState_Ensure();
      results[static_cast<size_t>(i)] = PyObject_CallNoArgs(fns[i]);
      if (results[static_cast<size_t>(i)] == nullptr) {
        PyObject *t, *v, *tb;
        PyErr_Fetch(&t, &v, &tb);
        if (err_type == nullptr) {  // the first error (under the GIL) is kept, the others dropped
          err_type = t, err_value = v, err_tb = tb;
        } else {
          Py_XDECREF(t), Py_XDECREF(v), Py_XDECREF(tb);
        }
      }
      PyGILState_Release(gil);
    }
  }
  Py_END_ALLOW_THREADS
  Py_DECREF(seq);
  if (err_type != nullptr) {
    for (PyObject* r : results) Py_XDECREF(r);
    PyErr_Restore(err_type, err_value, err_tb);
    return nullptr;
  }
  PyObject* out = PyList_New(n);
  if (out == nullptr) {
    for (PyObject* r : results) Py_XDECREF(r);
    return nullptr;
  }
  for (Py_ssize_t i = 0; i < n; ++i) PyList_SET_ITEM(out, i, results[static_cast<size_t>(i)]);  // steals
  return out;
}

// fastprune._C.sparse_conv2d_cpu(x, row_ptr, col_idx, values, bias, kh, kw, stride_h, stride_w, pad_h,
// pad_w, algo, epilogue, residual=None) -> Tensor: the CPU kernel of fastprune::sparse_conv2d_ext (the
// same function, the same checks and output) called without the dispatcher, for inference on CPU tensors
// (SparseModel's inference path; no autograd: the output records no graph). At batch 1 a layer's
// kernel is tens of microseconds, and the op call's argument conversion and dispatch cost about 2 us
// of it (Zen 4). bias and residual may be None; the GIL is released while the kernel runs, as the op
// call does (micro-batches run Python on the other threads meanwhile).
const at::Tensor* tensor_arg(PyObject* obj, const char* function, const char* name) {
  if (!THPVariable_Check(obj)) {
    PyErr_Format(PyExc_TypeError, "%s: %s must be a Tensor, got %s", function, name, Py_TYPE(obj)->tp_name);
    return nullptr;
  }
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.device().is_cpu()) {
    PyErr_Format(PyExc_ValueError, "%s: %s must be a CPU tensor", function, name);
    return nullptr;
  }
  return &t;
}

// The first `count` arguments as CPU tensors named `names` (false on a Python error, set).
bool tensor_args(PyObject* const* args, int count, const char* function, const char* const* names,
                 const at::Tensor** out) {
  for (int i = 0; i < count; ++i)
    if ((out[i] = tensor_arg(args[i], function, names[i])) == nullptr) return false;
  return true;
}

// An optional tensor argument: None, or a CPU tensor (false on a Python error, set).
bool optional_tensor_arg(PyObject* obj, const char* function, const char* name, std::optional<at::Tensor>& out) {
  if (obj == Py_None) return true;
  const at::Tensor* t = tensor_arg(obj, function, name);
  if (t == nullptr) return false;
  out = *t;
  return true;
}

PyObject* sparse_conv2d_cpu_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 13 && nargs != 14) {
    PyErr_Format(PyExc_TypeError, "sparse_conv2d_cpu: expected 13 or 14 arguments, got %zd", nargs);
    return nullptr;
  }
  static const char* const tensor_names[] = {"x", "row_ptr", "col_idx", "values"};
  const at::Tensor* tensors[4];
  if (!tensor_args(args, 4, "sparse_conv2d_cpu", tensor_names, tensors)) return nullptr;
  std::optional<at::Tensor> bias, residual;
  if (!optional_tensor_arg(args[4], "sparse_conv2d_cpu", "bias", bias) ||
      (nargs == 14 && !optional_tensor_arg(args[13], "sparse_conv2d_cpu", "residual", residual)))
    return nullptr;
  int64_t ints[8];  // kh, kw, stride_h, stride_w, pad_h, pad_w, algo, epilogue
  for (int i = 0; i < 8; ++i) {
    PyObject* arg = args[5 + i];
    if (!PyLong_Check(arg)) {
      PyErr_Format(PyExc_TypeError, "sparse_conv2d_cpu: argument %d must be an int, got %s", 5 + i,
                   Py_TYPE(arg)->tp_name);
      return nullptr;
    }
    ints[i] = PyLong_AsLongLong(arg);
    if (ints[i] == -1 && PyErr_Occurred()) return nullptr;
  }
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = fastprune::sparse_cpu::sparse_conv2d_cpu(*tensors[0], *tensors[1], *tensors[2], *tensors[3], bias, ints[0],
                                                   ints[1], ints[2], ints[3], ints[4], ints[5], ints[6], ints[7],
                                                   residual);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// fastprune._C.pooled_linear_cpu(x, row_ptr, col_idx, values, bias) -> Tensor: global average pooling,
// flatten and a CSR linear in one call (linear.cpp) on x (N, C, H, W) with batch-innermost channel
// planes: a classifier head in the inference graph (fastprune/nn/sparse/inference_graph.py).
PyObject* pooled_linear_cpu_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5) {
    PyErr_Format(PyExc_TypeError, "pooled_linear_cpu: expected 5 arguments, got %zd", nargs);
    return nullptr;
  }
  static const char* const tensor_names[] = {"x", "row_ptr", "col_idx", "values"};
  const at::Tensor* tensors[4];
  if (!tensor_args(args, 4, "pooled_linear_cpu", tensor_names, tensors)) return nullptr;
  std::optional<at::Tensor> bias;
  if (!optional_tensor_arg(args[4], "pooled_linear_cpu", "bias", bias)) return nullptr;
  at::Tensor out;
  {
    pybind11::gil_scoped_release no_gil;
    out = fastprune::sparse_cpu::pooled_linear_cpu(*tensors[0], *tensors[1], *tensors[2], *tensors[3], bias);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"sparse_conv2d_cpu", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(sparse_conv2d_cpu_call)),
     METH_FASTCALL,
     "sparse_conv2d_cpu(x, row_ptr, col_idx, values, bias, kh, kw, stride_h, stride_w, pad_h, pad_w, algo, "
     "epilogue, residual=None) -> Tensor: fastprune::sparse_conv2d_ext's CPU kernel without the dispatcher "
     "(inference: no autograd)"},
    {"pooled_linear_cpu", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(pooled_linear_cpu_call)),
     METH_FASTCALL,
     "pooled_linear_cpu(x, row_ptr, col_idx, values, bias) -> Tensor: global average pooling, flatten and a CSR "
     "linear of x (N, C, H, W) whose channel planes are (H, W, N) contiguous (inference: no autograd)"},
    {"run_team", run_team, METH_O,
     "run_team(callables) -> list: callables[i]() on thread i of one OpenMP team, each thread's own "
     "parallel regions on it alone; their results in order"},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

// `import fastprune._C` loads the library (its static initialisers register the ops); the module
// holds three Python functions of its own: run_team, sparse_conv2d_cpu and pooled_linear_cpu.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
