// pybind11 entry point of the native extension bye_fast._C.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
    m.doc() = "bye_fast native extension: streaming bimodal-separation statistics";
    m.attr("__version__") = "0.1.0";
}
