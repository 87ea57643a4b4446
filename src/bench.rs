//! `_lightws.run_bench`: the Python face of the load generator
//! (`crates/lightws-loadgen`), behind `python -m lightws bench` and bench/*.py.
//!
//! Compiled only with the `loadgen` cargo feature (off by default; see the feature's
//! comment in Cargo.toml), so the production extension ships neither the generator nor
//! its accept-any-certificate TLS verifier. Without it `_lightws` has no `run_bench`
//! and `python -m lightws bench` says how to build it in.

use lightws_loadgen::{BenchError, Mode, Options, Report};
use parking_lot::Mutex;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

fn report_dict<'py>(py: Python<'py>, r: &Report) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("mode", r.mode)?;
    d.set_item("url", &r.url)?;
    d.set_item("connections", r.connections)?;
    d.set_item("opened", r.opened)?;
    d.set_item("failed", r.failed)?;
    d.set_item("open_at_end", r.open_at_end)?;
    d.set_item("size", r.size)?;
    d.set_item("seconds", r.seconds)?;
    d.set_item("messages", r.messages)?;
    d.set_item("bytes", r.bytes)?;
    d.set_item("msgs_per_s", r.msgs_per_s)?;
    d.set_item("mb_per_s", r.mb_per_s)?;
    if r.mode == "rate" {
        d.set_item("target_rate", r.target_rate)?;
        d.set_item("sent", r.sent)?;
        d.set_item("timeouts", r.timeouts)?;
    }
    if let Some(l) = &r.latency {
        let ld = PyDict::new(py);
        ld.set_item("count", l.count)?;
        ld.set_item("mean_us", l.mean_us)?;
        ld.set_item("p50_us", l.p50_us)?;
        ld.set_item("p90_us", l.p90_us)?;
        ld.set_item("p99_us", l.p99_us)?;
        ld.set_item("p99_9_us", l.p999_us)?;
        ld.set_item("max_us", l.max_us)?;
        d.set_item("latency", ld)?;
    }
    if let Some(c) = &r.chat {
        d.set_item("subscribers", c.subscribers)?;
        d.set_item("stalled", c.stalled)?;
        d.set_item("window", c.window)?;
        d.set_item("joined", c.joined)?;
        d.set_item("deliveries", c.deliveries)?;
        d.set_item("deliveries_per_s", c.deliveries_per_s)?;
        d.set_item("sent", c.sent)?;
        d.set_item("completed", c.completed)?;
        d.set_item("stalls", c.stalls)?;
        d.set_item("publisher_copies", c.publisher_copies)?;
        d.set_item("client_cpu_s", c.client_cpu_s)?;
        d.set_item("window_start_ns", c.window_start_ns)?;
        d.set_item("window_end_ns", c.window_end_ns)?;
        let t = &c.tally;
        let check = PyDict::new(py);
        check.set_item("subscribers", t.subscribers)?;
        check.set_item("complete", t.complete)?;
        check.set_item("missing", t.missing)?;
        check.set_item("duplicated", t.duplicated)?;
        check.set_item("out_of_order", t.out_of_order)?;
        check.set_item("min_received", t.min_received)?;
        check.set_item("max_received", t.max_received)?;
        check.set_item("lost", t.lost)?;
        d.set_item("check", check)?;
        let s = &t.stalled;
        let st = PyDict::new(py);
        st.set_item("opened", s.opened)?;
        st.set_item("messages", s.messages)?;
        st.set_item("min_messages", s.min_messages)?;
        st.set_item("max_messages", s.max_messages)?;
        let codes = PyDict::new(py);
        for (code, n) in &s.close_codes {
            codes.set_item(code.to_string(), n)?;
        }
        st.set_item("close_codes", codes)?;
        st.set_item("ended_without_close", s.ended_without_close)?;
        st.set_item("still_open", s.still_open)?;
        d.set_item("stalled_clients", st)?;
    }
    d.set_item("errors", r.errors.clone())?;
    Ok(d)
}

/// Run a load (`mode` = `"echo"`, `"rate"`, `"idle"`, `"chat"`) against `url` and
/// return the report as a dict; or, with `mode="floor-server"`, serve the
/// minimal native echo server on `url` (`host:port`) until interrupted.
///
/// The GIL is released for the whole run; Ctrl-C (any pending signal whose
/// handler raises) stops it and is re-raised.
#[pyfunction]
#[pyo3(signature = (
    mode, url, *, connections=100, size=64, pipeline=1, duration=5.0, warmup=1.0,
    rate=10000.0, sources=0, insecure=false, cafile=None, text=false, progress=true,
    threads=1, stalled=0
))]
#[allow(clippy::too_many_arguments)]
pub fn run_bench<'py>(
    py: Python<'py>,
    mode: &str,
    url: &str,
    connections: usize,
    size: usize,
    pipeline: usize,
    duration: f64,
    warmup: f64,
    rate: f64,
    sources: usize,
    insecure: bool,
    cafile: Option<String>,
    text: bool,
    progress: bool,
    threads: usize,
    stalled: usize,
) -> PyResult<Option<Bound<'py, PyDict>>> {
    // The signal check runs on this (the main) thread, GIL taken briefly.
    let signal_error: Mutex<Option<PyErr>> = Mutex::new(None);
    let interrupted = || {
        Python::attach(|py| match py.check_signals() {
            Ok(()) => false,
            Err(e) => {
                *signal_error.lock() = Some(e);
                true
            }
        })
    };
    let mode = match mode {
        "echo" => Mode::Echo,
        "rate" => Mode::Rate,
        "idle" => Mode::Idle,
        "chat" => Mode::Chat,
        "floor-server" => {
            let result = py.detach(|| lightws_loadgen::serve_floor(url, progress, &interrupted));
            if let Some(e) = signal_error.lock().take() {
                return Err(e);
            }
            return result
                .map(|()| None)
                .map_err(|e| PyOSError::new_err(format!("floor server on {url}: {e}")));
        }
        other => {
            return Err(PyValueError::new_err(format!(
                "unknown mode {other:?} (echo, rate, idle, chat, floor-server)"
            )))
        }
    };
    let opts = Options {
        mode,
        url: url.to_string(),
        connections,
        size,
        pipeline,
        duration,
        warmup,
        rate,
        sources,
        insecure,
        cafile,
        text,
        progress,
        threads,
        stalled,
    };
    let result = py.detach(|| lightws_loadgen::run(opts, &interrupted));
    if let Some(e) = signal_error.lock().take() {
        return Err(e);
    }
    match result {
        Ok(report) => report_dict(py, &report).map(Some),
        Err(BenchError::Invalid(m)) => Err(PyValueError::new_err(m)),
        Err(BenchError::Io(e)) => Err(match e.raw_os_error() {
            Some(errno) => PyOSError::new_err((errno, e.to_string())),
            None => PyOSError::new_err(e.to_string()),
        }),
        Err(BenchError::Interrupted) => Err(pyo3::exceptions::PyKeyboardInterrupt::new_err(())),
    }
}
