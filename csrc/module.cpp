// `import kangaroo_ext._C`: loading this shared library runs registration.cpp's static
// registrations (torch.ops.kangaroo.*). The module itself reports what it was built for and exposes
// the CUDA-graph branching calls of graph_branch.h (not tensor ops: they steer a capture), taking
// plain integers (a device pointer, counts) that kangaroo_ext/engine/conditional.py validates.
// Plain CPython API: nothing here needs pybind11.
#include <Python.h>

#include <exception>
#include <string>

#include "graph_branch.h"

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

// C++ exceptions (c10::Error from TORCH_CHECK / C10_CUDA_CHECK) become Python RuntimeErrors.
template <typename Fn>
PyObject* guarded(Fn&& fn) {
  try {
    return fn();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}

PyObject* branch_unsupported_reason(PyObject*, PyObject* args) {
  int device = 0;
  if (!PyArg_ParseTuple(args, "i", &device)) return nullptr;
  return guarded([&] {
    const std::string reason = kangaroo::graph::branch_unsupported_reason(device);
    return PyUnicode_FromString(reason.c_str());
  });
}

PyObject* branch_begin(PyObject*, PyObject* args) {
  unsigned long long values = 0, pool_a = 0, pool_b = 0;
  long long n = 0, num_branches = 0;
  int is_bool = 0, device = 0;
  if (!PyArg_ParseTuple(args, "KLpLi(KK)", &values, &n, &is_bool, &num_branches, &device, &pool_a, &pool_b))
    return nullptr;
  return guarded([&] {
    kangaroo::graph::branch_begin(static_cast<std::uintptr_t>(values), n, is_bool != 0, num_branches, device,
                                  {pool_a, pool_b});
    Py_RETURN_NONE;
  });
}

PyObject* branch_select(PyObject*, PyObject* args) {
  long long index = 0;
  if (!PyArg_ParseTuple(args, "L", &index)) return nullptr;
  return guarded([&] {
    kangaroo::graph::branch_select(index);
    Py_RETURN_NONE;
  });
}

PyObject* branch_end(PyObject*, PyObject*) {
  return guarded([&] {
    kangaroo::graph::branch_end();
    Py_RETURN_NONE;
  });
}

PyMethodDef kMethods[] = {
    {"branch_unsupported_reason", branch_unsupported_reason, METH_VARARGS,
     "branch_unsupported_reason(device) -> str: why conditional graph nodes cannot be captured ('' if they can)"},
    {"branch_begin", branch_begin, METH_VARARGS,
     "branch_begin(values_ptr, n, is_bool, num_branches, device, pool): add a conditional node to the capture"},
    {"branch_select", branch_select, METH_VARARGS, "branch_select(i): capture what follows into body i"},
    {"branch_end", branch_end, METH_NOARGS, "branch_end(): close the node; capture continues after it"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT,
    "_C",                                                              // m_name
    "CUDA kernels of kangaroo_ext, registered as torch.ops.kangaroo.*",  // m_doc
    -1,                                                                // m_size: no per-module state
    kMethods,                                                          // m_methods
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
