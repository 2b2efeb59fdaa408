// The Python module pypeft_fast._C. Loading it registers the ops (static initialisers of
// TORCH_LIBRARY in ops.cpp and the .cu files); its only Python function is build_info().
// Plain CPython API: no pybind11, no torch/extension.h (about 40 s of compile time each).
#include <Python.h>

#include "ops.h"

#ifndef PPF_TORCH_VERSION
#define PPF_TORCH_VERSION "unknown"
#endif
#ifndef PPF_CUDA_ARCHS
#define PPF_CUDA_ARCHS ""
#endif
#ifndef PPF_CUDA_VERSION
#define PPF_CUDA_VERSION ""
#endif
#ifndef PPF_ABI_VERSION
#define PPF_ABI_VERSION 1
#endif

namespace {

PyObject* build_info(PyObject*, PyObject*) {
#ifdef PPF_WITH_CUDA
  PyObject* with_cuda = Py_True;
#else
  PyObject* with_cuda = Py_False;
#endif
#ifdef _OPENMP
  PyObject* openmp = Py_True;
#else
  PyObject* openmp = Py_False;
#endif
  PyObject* gemm_bf16_f32 = pypeft_fast::gemm_bf16_f32_available() ? Py_True : Py_False;
  return Py_BuildValue("{s:i,s:s,s:O,s:s,s:s,s:s,s:O,s:O}", "abi", PPF_ABI_VERSION,
                       "torch_version", PPF_TORCH_VERSION, "with_cuda", with_cuda, "cuda_version",
                       PPF_CUDA_VERSION, "cuda_archs", PPF_CUDA_ARCHS, "compiler",
                       "gcc " __VERSION__, "openmp", openmp, "mkl_gemm_bf16_f32", gemm_bf16_f32);
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS,
     "build_info() -> dict: abi, torch_version built against, with_cuda, cuda_version, "
     "cuda_archs, compiler, openmp, mkl_gemm_bf16_f32 (whether the torch it loaded exports "
     "MKL's cblas_gemm_bf16bf16f32, which gemm_bf16_f32 runs)."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                          "pypeft_fast native kernels (ops under torch.ops.pypeft_fast)", -1,
                          methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
