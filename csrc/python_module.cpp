// The Python extension module ensattr_fast._C. It holds no functions: importing
// it loads this library, whose static initialisers register the ops with the
// dispatcher (torch.ops.ensattr_fast.*). C++ users link the library without it.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "ensattr_fast's compiled ops", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
}
