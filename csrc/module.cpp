// `import kangaroo_ext._C`: loading this shared library runs registration.cpp's static
// registrations (torch.ops.kangaroo.*). The module itself only reports what it was built for.
// Plain CPython API: nothing here needs pybind11.
#include <Python.h>

// Two levels so the macro's value, not its name, is stringified. setup.py / CMakeLists.txt pass
// the arch list as one preprocessor number (e.g. 8.0_9.0a) to avoid shell quoting.
#define KANGAROO_STRINGIFY_IMPL(x) #x
#define KANGAROO_STRINGIFY(x) KANGAROO_STRINGIFY_IMPL(x)

#ifdef KANGAROO_CUDA_ARCHS
#define KANGAROO_CUDA_ARCHS_STR KANGAROO_STRINGIFY(KANGAROO_CUDA_ARCHS)
#else
#define KANGAROO_CUDA_ARCHS_STR "unknown"
#endif

namespace {

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT,
    "_C",                                                              // m_name
    "CUDA kernels of kangaroo_ext, registered as torch.ops.kangaroo.*",  // m_doc
    -1,                                                                // m_size: no per-module state
    nullptr,                                                           // m_methods
    nullptr,                                                           // m_slots
    nullptr,                                                           // m_traverse
    nullptr,                                                           // m_clear
    nullptr,                                                           // m_free
};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&kModule);
  if (m == nullptr) return nullptr;
  if (PyModule_AddStringConstant(m, "CUDA_ARCH_LIST", KANGAROO_CUDA_ARCHS_STR) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
