//! The one place where what Rust knows about a failure becomes a Python exception.

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use super::api::api;
use crate::lockcheck::assert_unlocked;
use crate::session::CloseInfo;
use crate::tls::TlsError;

pub(super) fn closed_exception(py: Python<'_>, info: &CloseInfo) -> PyErr {
    assert_unlocked("building ConnectionClosed");
    match api(py) {
        Ok(api) => {
            // RFC 6455 7.4.1: 1002 protocol error and 1007 invalid data are what lightws
            // closes with when the peer breaks the protocol, 1009 when its message is over
            // max_msg_len (a peer may close with them too). Both classes subclass
            // ConnectionClosedError.
            let cls = match info.code {
                1000 | 1001 => &api.closed_ok,
                1002 | 1007 => &api.protocol_error,
                1009 => &api.payload_too_big,
                _ => &api.closed_error,
            };
            match cls.call1(py, (info.code, info.reason.as_str())) {
                Ok(obj) => PyErr::from_value(obj.into_bound(py)),
                Err(e) => e,
            }
        }
        Err(e) => e,
    }
}

pub(super) fn streaming_error() -> PyErr {
    PyRuntimeError::new_err("the next message is being streamed to conn.reader(); read it there")
}

pub(super) fn end_error(py: Python<'_>, info: &CloseInfo, anext: bool) -> PyErr {
    if anext && matches!(info.code, 1000 | 1001) {
        pyo3::exceptions::PyStopAsyncIteration::new_err(())
    } else {
        closed_exception(py, info)
    }
}

pub(super) fn tls_err(e: TlsError) -> PyErr {
    if e.is_os_error() {
        PyOSError::new_err(e.to_string())
    } else {
        PyValueError::new_err(e.to_string())
    }
}
