// pybind11 entry point of the native extension bye_fast._C.
//
// The user-facing API is bye_fast.stats (Python); this layer validates arguments, converts to and
// from numpy arrays, releases the GIL around the heavy work and serialises access to each object
// with a per-object mutex (the C++ class itself is not thread-safe).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "bimodal_stats.h"
#include "columns.h"

namespace py = pybind11;

namespace {

struct PyBimodalStats {
    bye::BimodalStats s;
    std::mutex mu;
    explicit PyBimodalStats(bye::BimodalStats st) : s(std::move(st)) {}
};

// Lock `mu` without ever blocking on it while holding the GIL (the holder may be a thread that
// released the GIL and later needs it back), so the GIL and the mutex cannot deadlock.
std::unique_lock<std::mutex> lock_nogil(std::mutex& mu) {
    std::unique_lock<std::mutex> lk(mu, std::try_to_lock);
    if (!lk.owns_lock()) {
        py::gil_scoped_release release;
        lk.lock();
    }
    return lk;
}

template <class T>
py::array_t<T> to_array(const std::vector<T>& v) {
    py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
}

template <class T>
py::array_t<T> to_array_2d(const std::vector<T>& v, std::int64_t rows, std::int64_t cols) {
    py::array_t<T> a({static_cast<py::ssize_t>(rows), static_cast<py::ssize_t>(cols)});
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
}

template <class Fn>
py::array_t<double> per_feature(PyBimodalStats& self, Fn fn) {
    auto lk = lock_nogil(self.mu);
    const std::int64_t F = self.s.n_features();
    py::array_t<double> a(static_cast<py::ssize_t>(F));
    double* out = a.mutable_data();
    for (std::int64_t f = 0; f < F; ++f) out[f] = fn(self.s, f);
    return a;
}

std::string shape_str(const py::array& x) {
    std::string s = "(";
    for (py::ssize_t i = 0; i < x.ndim(); ++i) {
        if (i) s += ", ";
        s += std::to_string(x.shape(i));
    }
    if (x.ndim() == 1) s += ",";
    return s + ")";
}

void update(PyBimodalStats& self, py::array x) {
    const std::int64_t F = self.s.n_features();  // immutable: no lock needed
    const bool f32 = x.dtype().equal(py::dtype::of<float>());
    const bool f64 = x.dtype().equal(py::dtype::of<double>());
    if (!f32 && !f64) {
        throw py::type_error("x must be a float32 or float64 array (native byte order); got dtype " +
                             py::str(x.dtype()).cast<std::string>());
    }
    std::int64_t n_rows = 0;
    if (x.ndim() == 2 && x.shape(1) == F) {
        n_rows = x.shape(0);
    } else if (x.ndim() == 1 && F == 1) {
        n_rows = x.shape(0);
    } else {
        throw py::value_error("x must have shape (n_rows, " + std::to_string(F) + ")" +
                              (F == 1 ? std::string(" or (n_rows,)") : std::string()) + "; got shape " +
                              shape_str(x));
    }
    if (n_rows == 0) return;
    const auto item = static_cast<py::ssize_t>(x.itemsize());
    auto misaligned = [&]() {
        if (reinterpret_cast<std::uintptr_t>(x.data()) % static_cast<std::uintptr_t>(item) != 0) return true;
        for (py::ssize_t d = 0; d < x.ndim(); ++d) {
            if (x.strides(d) % item != 0) return true;
        }
        return false;
    };
    if (misaligned()) {
        // Rare (views into packed records): one aligned copy so the kernels can use typed pointers.
        x = py::module_::import("numpy").attr("ascontiguousarray")(x);
    }
    const std::ptrdiff_t rs = x.strides(0) / item;
    const std::ptrdiff_t cs = x.ndim() == 2 ? x.strides(1) / item : 0;
    const void* data = x.data();
    py::gil_scoped_release release;
    std::lock_guard<std::mutex> lk(self.mu);
    if (f32) {
        self.s.update(static_cast<const float*>(data), n_rows, rs, cs);
    } else {
        self.s.update(static_cast<const double*>(data), n_rows, rs, cs);
    }
}

void merge(PyBimodalStats& self, PyBimodalStats& other) {
    py::gil_scoped_release release;
    if (&self == &other) {
        std::lock_guard<std::mutex> lk(self.mu);
        self.s.merge(other.s);
    } else {
        std::scoped_lock lk(self.mu, other.mu);  // deadlock-free for a.merge(b) || b.merge(a)
        self.s.merge(other.s);
    }
}

py::dict fit(PyBimodalStats& self, int max_iter, double tol, double reg_covar, int n_threads) {
    bye::FitOptions opt;
    opt.max_iter = max_iter;
    opt.tol = tol;
    opt.reg_covar = reg_covar;
    opt.n_threads = n_threads;
    bye::FitResult r;
    {
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lk(self.mu);
        r = self.s.fit(opt);
    }
    const std::int64_t F = r.n_features;
    py::dict d;
    d["weights"] = to_array_2d(r.weights, F, 2);
    d["means"] = to_array_2d(r.means, F, 2);
    d["stds"] = to_array_2d(r.stds, F, 2);
    d["n_iter"] = to_array(r.n_iter);
    py::array_t<bool> conv(static_cast<py::ssize_t>(F));
    for (std::int64_t f = 0; f < F; ++f) conv.mutable_data()[f] = r.converged[f] != 0;
    d["converged"] = conv;
    d["log_likelihood"] = to_array(r.log_likelihood);
    d["separation"] = to_array(r.separation);
    d["ashman_d"] = to_array(r.ashman_d);
    d["kl"] = to_array(r.kl);
    d["bimodality_coefficient"] = to_array(r.bimodality_coefficient);
    d["otsu_threshold"] = to_array(r.otsu_threshold);
    return d;
}

py::bytes to_bytes(PyBimodalStats& self) {
    std::vector<std::uint8_t> blob;
    {
        py::gil_scoped_release release;
        std::lock_guard<std::mutex> lk(self.mu);
        blob = self.s.to_bytes();
    }
    return py::bytes(reinterpret_cast<const char*>(blob.data()), blob.size());
}

std::unique_ptr<PyBimodalStats> from_bytes(const py::bytes& b) {
    char* buf = nullptr;
    py::ssize_t len = 0;
    if (PyBytes_AsStringAndSize(b.ptr(), &buf, &len) != 0) throw py::error_already_set();
    // `b` is immutable and referenced by the caller for the whole call, so the buffer stays valid.
    py::gil_scoped_release release;
    return std::make_unique<PyBimodalStats>(
        bye::BimodalStats::from_bytes(reinterpret_cast<const std::uint8_t*>(buf), static_cast<std::size_t>(len)));
}

template <class T>
py::array gather_columns_t(const py::array& x, const py::array_t<std::int64_t, py::array::c_style>& rows,
                           std::int64_t j0, std::int64_t j1) {
    const std::int64_t n = x.shape(0), m = rows.shape(0), b = j1 - j0;
    const std::int64_t rs = x.strides(0) / static_cast<std::int64_t>(sizeof(T));
    const std::int64_t cs = x.strides(1) / static_cast<std::int64_t>(sizeof(T));
    const std::int64_t* r = rows.data();
    for (std::int64_t i = 0; i < m; ++i) {
        if (r[i] < 0 || r[i] >= n) {
            throw py::index_error("rows[" + std::to_string(i) + "] = " + std::to_string(r[i]) +
                                  " is out of range for " + std::to_string(n) + " rows");
        }
    }
    py::array_t<T> out({static_cast<py::ssize_t>(b), static_cast<py::ssize_t>(m)});
    const T* src = static_cast<const T*>(x.data());
    T* dst = out.mutable_data();
    {
        py::gil_scoped_release release;
        bye::gather_transpose<T>(src, rs, cs, r, m, j0, b, dst);
    }
    return out;
}

// x: (n, F) float32/float64 (any strides that are whole elements); rows: int64 (m,); -> (j1 - j0, m).
py::array gather_columns(const py::array& x, const py::array_t<std::int64_t, py::array::c_style>& rows,
                         std::int64_t j0, std::int64_t j1) {
    if (x.ndim() != 2) throw py::value_error("x must be 2-D; got shape " + shape_str(x));
    if (rows.ndim() != 1) throw py::value_error("rows must be 1-D");
    if (j0 < 0 || j1 < j0 || j1 > x.shape(1)) {
        throw py::index_error("columns " + std::to_string(j0) + ":" + std::to_string(j1) + " out of range for " +
                              std::to_string(x.shape(1)) + " columns");
    }
    const bool f32 = x.dtype().equal(py::dtype::of<float>());
    const bool f64 = x.dtype().equal(py::dtype::of<double>());
    if (!f32 && !f64) throw py::type_error("x must be float32 or float64 (native byte order)");
    const auto item = static_cast<py::ssize_t>(f32 ? sizeof(float) : sizeof(double));
    if (x.strides(0) % item || x.strides(1) % item) throw py::value_error("x's strides must be whole elements");
    return f32 ? gather_columns_t<float>(x, rows, j0, j1) : gather_columns_t<double>(x, rows, j0, j1);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "bye_fast native extension: streaming bimodal-separation statistics, column gathers";
    m.attr("__version__") = "0.1.0";
    m.def("gather_columns", &gather_columns, py::arg("x"), py::arg("rows"), py::arg("j0"), py::arg("j1"),
          "x[rows, j0:j1].T as a new C-contiguous array (one cache-tiled pass; releases the GIL)");

    py::class_<PyBimodalStats>(m, "BimodalStats",
                               "Native core of bye_fast.stats.BimodalStats; use that class instead.")
        .def(py::init([](std::int64_t n_features, double lo, double hi, std::int64_t bins) {
                 return std::make_unique<PyBimodalStats>(bye::BimodalStats(n_features, lo, hi, bins));
             }),
             py::arg("n_features"), py::arg("lo"), py::arg("hi"), py::arg("bins") = 4096)
        .def("update", &update, py::arg("x"))
        .def("merge", &merge, py::arg("other"))
        .def("fit", &fit, py::arg("max_iter") = 200, py::arg("tol") = 1e-8, py::arg("reg_covar") = 1e-6,
             py::arg("n_threads") = 1)
        .def("to_bytes", &to_bytes)
        .def_static("from_bytes", &from_bytes, py::arg("blob"))
        .def("copy",
             [](PyBimodalStats& self) {
                 auto lk = lock_nogil(self.mu);
                 return std::make_unique<PyBimodalStats>(self.s);
             })
        .def_property_readonly("n_features", [](PyBimodalStats& self) { return self.s.n_features(); })
        .def_property_readonly("lo", [](PyBimodalStats& self) { return self.s.lo(); })
        .def_property_readonly("hi", [](PyBimodalStats& self) { return self.s.hi(); })
        .def_property_readonly("bins", [](PyBimodalStats& self) { return self.s.bins(); })
        .def_property_readonly("bin_width", [](PyBimodalStats& self) { return self.s.bin_width(); })
        .def_property_readonly("count",
                               [](PyBimodalStats& self) {
                                   auto lk = lock_nogil(self.mu);
                                   return to_array(self.s.count());
                               })
        .def_property_readonly("mean",
                               [](PyBimodalStats& self) {
                                   return per_feature(self, [](const bye::BimodalStats& s, std::int64_t f) {
                                       return s.mean(f);
                                   });
                               })
        .def_property_readonly("var",
                               [](PyBimodalStats& self) {
                                   return per_feature(self, [](const bye::BimodalStats& s, std::int64_t f) {
                                       return s.variance(f);
                                   });
                               })
        .def_property_readonly("skewness",
                               [](PyBimodalStats& self) {
                                   return per_feature(self, [](const bye::BimodalStats& s, std::int64_t f) {
                                       return s.skewness(f);
                                   });
                               })
        .def_property_readonly("kurtosis",
                               [](PyBimodalStats& self) {
                                   return per_feature(self, [](const bye::BimodalStats& s, std::int64_t f) {
                                       return s.excess_kurtosis(f);
                                   });
                               })
        .def_property_readonly("min",
                               [](PyBimodalStats& self) {
                                   return per_feature(self, [](const bye::BimodalStats& s, std::int64_t f) {
                                       return s.count()[f] ? s.min()[f] : std::nan("");
                                   });
                               })
        .def_property_readonly("max",
                               [](PyBimodalStats& self) {
                                   return per_feature(self, [](const bye::BimodalStats& s, std::int64_t f) {
                                       return s.count()[f] ? s.max()[f] : std::nan("");
                                   });
                               })
        .def_property_readonly("m2",
                               [](PyBimodalStats& self) {
                                   auto lk = lock_nogil(self.mu);
                                   return to_array(self.s.m2());
                               })
        .def_property_readonly("m3",
                               [](PyBimodalStats& self) {
                                   auto lk = lock_nogil(self.mu);
                                   return to_array(self.s.m3());
                               })
        .def_property_readonly("m4",
                               [](PyBimodalStats& self) {
                                   auto lk = lock_nogil(self.mu);
                                   return to_array(self.s.m4());
                               })
        .def_property_readonly("hist",
                               [](PyBimodalStats& self) {
                                   auto lk = lock_nogil(self.mu);
                                   return to_array_2d(self.s.histogram(), self.s.n_features(), self.s.bins());
                               })
        .def_property_readonly("n_nonfinite",
                               [](PyBimodalStats& self) {
                                   auto lk = lock_nogil(self.mu);
                                   return to_array(self.s.n_nonfinite());
                               })
        .def_property_readonly("n_clamped_low",
                               [](PyBimodalStats& self) {
                                   auto lk = lock_nogil(self.mu);
                                   return to_array(self.s.n_clamped_low());
                               })
        .def_property_readonly("n_clamped_high", [](PyBimodalStats& self) {
            auto lk = lock_nogil(self.mu);
            return to_array(self.s.n_clamped_high());
        });
}
