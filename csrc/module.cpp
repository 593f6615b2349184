// Python module shell for fastmdl._C. Importing it runs the TORCH_LIBRARY
// registrations of the other translation units; it exposes no Python functions.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastmdl C++/CUDA kernels (registered as torch.ops.fastmdl.*)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}
