// The Python module `fastdiff._C`. Importing it loads this shared library,
// whose static initializers register the ops (TORCH_LIBRARY_FRAGMENT /
// TORCH_LIBRARY_IMPL in the per-op files) under the `fastdiff_ext` namespace.
// No pybind11: the ops are reached through torch.ops.fastdiff_ext.*.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastdiff C++/CUDA kernels (see torch.ops.fastdiff_ext)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
