//! Python objects the bridge uses, looked up once when the first server is created
//! (`Core::new`), not by name on first use in the middle of a connection.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use crate::frame::OpCode;
use crate::stats::OPCODES;

/// Python objects looked up once: Opcode members and the ConnectionClosed classes.
pub(super) struct PyApi {
    pub(super) opcodes: Vec<Option<Py<PyAny>>>,
    pub(super) closed_ok: Py<PyAny>,
    pub(super) closed_error: Py<PyAny>,
    pub(super) protocol_error: Py<PyAny>,
    pub(super) payload_too_big: Py<PyAny>,
    pub(super) reader: Py<PyAny>,
    pub(super) writer: Py<PyAny>,
    pub(super) closed_base: Py<PyAny>,
    pub(super) handler_failed: Py<PyAny>,
    /// `lightws.server._listener_failed(conn, method, exc, returned, closing)`.
    pub(super) listener_failed: Py<PyAny>,
    /// An empty `contextvars.Context` shared by the handler tasks' done callbacks.
    pub(super) empty_context: Py<PyAny>,
    /// `lightws.Listener`, whose no-op methods a listener may inherit.
    pub(super) listener_base: Py<PyAny>,
    /// `weakref.getweakrefcount`.
    pub(super) getweakrefcount: Py<PyAny>,
    /// `asyncio.InvalidStateError`: what `Future.result()` raises while pending.
    pub(super) invalid_state: Py<PyAny>,
    /// `asyncio.CancelledError`, raised by a cancelled `Waiter`.
    pub(super) cancelled: Py<PyAny>,
}

pub(super) static API: PyOnceLock<PyApi> = PyOnceLock::new();

pub(super) fn api(py: Python<'_>) -> PyResult<&PyApi> {
    API.get_or_try_init(py, || {
        let types = py.import("lightws._types")?;
        let opcode_cls = types.getattr("Opcode")?;
        let mut opcodes = Vec::with_capacity(OPCODES);
        for i in 0..OPCODES as u8 {
            opcodes.push(match OpCode::from_u8(i) {
                Some(_) => Some(opcode_cls.call1((i,))?.unbind()),
                None => None,
            });
        }
        let exc = py.import("lightws.exceptions")?;
        let streaming = py.import("lightws.streaming")?;
        let server = py.import("lightws.server")?;
        Ok(PyApi {
            opcodes,
            closed_ok: exc.getattr("ConnectionClosedOK")?.unbind(),
            closed_error: exc.getattr("ConnectionClosedError")?.unbind(),
            protocol_error: exc.getattr("ProtocolError")?.unbind(),
            payload_too_big: exc.getattr("PayloadTooBig")?.unbind(),
            reader: streaming.getattr("MessageReader")?.unbind(),
            writer: streaming.getattr("MessageWriter")?.unbind(),
            closed_base: exc.getattr("ConnectionClosed")?.unbind(),
            handler_failed: server.getattr("_handler_failed")?.unbind(),
            listener_failed: server.getattr("_listener_failed")?.unbind(),
            empty_context: py
                .import("contextvars")?
                .getattr("Context")?
                .call0()?
                .unbind(),
            listener_base: py.import("lightws.listener")?.getattr("Listener")?.unbind(),
            getweakrefcount: py.import("weakref")?.getattr("getweakrefcount")?.unbind(),
            invalid_state: py.import("asyncio")?.getattr("InvalidStateError")?.unbind(),
            cancelled: py.import("asyncio")?.getattr("CancelledError")?.unbind(),
        })
    })
}
