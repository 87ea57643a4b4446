//! `lightws.Message` and the conversions between Python payloads and bytes.

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyString, PyTuple};

use super::api::api;
use bytes::Bytes;

use crate::frame::{self, OpCode};
use crate::lockcheck::assert_unlocked;
use crate::session::Part;
use crate::shared::InMsg;

/// One WebSocket message: an opcode and its payload.
///
/// `Message(Opcode.TEXT, b"hi")`; `body` is always `bytes` (a `str` body is encoded as
/// UTF-8). `text` decodes the body as UTF-8 (TEXT messages from peers are already
/// validated).
#[pyclass(module = "lightws", frozen, name = "Message")]
pub struct Message {
    pub(super) opcode: u8,
    pub(super) body: Py<PyBytes>,
}

pub(super) fn known_opcode(v: i64) -> PyResult<OpCode> {
    u8::try_from(v)
        .ok()
        .and_then(OpCode::from_u8)
        .ok_or_else(|| {
            PyValueError::new_err(format!(
                "{v} is not a WebSocket opcode (use lightws.Opcode: 0, 1, 2, 8, 9 or 10)"
            ))
        })
}

/// Bytes-like or str to bytes; None for unsupported types.
pub(super) fn to_bytes<'py>(obj: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyBytes>>> {
    let py = obj.py();
    if let Ok(b) = obj.cast::<PyBytes>() {
        return Ok(Some(b.clone()));
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Some(PyBytes::new(py, s.to_str()?.as_bytes())));
    }
    if let Ok(b) = obj.cast::<PyByteArray>() {
        return Ok(Some(PyBytes::new(py, &b.to_vec())));
    }
    if obj.hasattr("__buffer__")? || obj.get_type().name()? == "memoryview" {
        let b = py.get_type::<PyBytes>().call1((obj,))?;
        return Ok(Some(b.cast_into::<PyBytes>()?));
    }
    Ok(None)
}

/// `message` encoded once as a whole data frame, to be shared by reference among many
/// connections: `str` -> TEXT, bytes-like -> BINARY, a `Message` -> its TEXT or BINARY
/// opcode. `what` names the caller in errors.
pub(super) fn data_frame(message: &Bound<'_, PyAny>, what: &str) -> PyResult<Bytes> {
    let (op, data) = if let Ok(s) = message.cast::<PyString>() {
        (OpCode::Text, s.to_str()?.as_bytes().to_vec())
    } else if let Ok(m) = message.cast::<Message>() {
        let m = m.get();
        let op = OpCode::from_u8(m.opcode).unwrap_or(OpCode::Binary);
        if !matches!(op, OpCode::Text | OpCode::Binary) {
            return Err(PyValueError::new_err(format!(
                "{what}() sends data messages: a TEXT or BINARY Message, not {}",
                op.name()
            )));
        }
        (op, m.body.as_bytes(message.py()).to_vec())
    } else {
        match to_bytes(message)? {
            Some(b) => (OpCode::Binary, b.as_bytes().to_vec()),
            None => {
                return Err(PyTypeError::new_err(format!(
                    "{what}() takes str, a bytes-like object or lightws.Message, not {}",
                    type_name(message)
                )))
            }
        }
    };
    let mut f = Vec::with_capacity(frame::MAX_HEADER_LEN + data.len());
    frame::encode_header(&mut f, true, op, data.len() as u64, None);
    f.extend_from_slice(&data);
    Ok(Bytes::from(f))
}

#[pymethods]
impl Message {
    #[new]
    #[pyo3(signature = (opcode, body = None))]
    fn new(py: Python<'_>, opcode: i64, body: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let op = known_opcode(opcode)?;
        let body = match body {
            None => PyBytes::new(py, b""),
            Some(b) => to_bytes(b)?.ok_or_else(|| {
                PyTypeError::new_err(format!(
                    "Message body must be bytes-like or str, not {}",
                    type_name(b)
                ))
            })?,
        };
        Ok(Self {
            opcode: op.as_u8(),
            body: body.unbind(),
        })
    }

    /// The opcode, a `lightws.Opcode`.
    #[getter]
    fn opcode(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let api = api(py)?;
        Ok(api.opcodes[self.opcode as usize]
            .as_ref()
            .map(|o| o.clone_ref(py))
            .unwrap_or_else(|| py.None()))
    }

    /// The payload as bytes.
    #[getter]
    fn body(&self, py: Python<'_>) -> Py<PyBytes> {
        self.body.clone_ref(py)
    }

    /// The payload decoded as UTF-8 (raises UnicodeDecodeError if it is not).
    #[getter]
    fn text<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.body.bind(py).call_method1("decode", ("utf-8",))
    }

    #[classattr]
    fn __match_args__() -> (&'static str, &'static str) {
        ("opcode", "body")
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let name = match OpCode::from_u8(self.opcode) {
            Some(OpCode::Continuation) => "CONTINUATION",
            Some(OpCode::Text) => "TEXT",
            Some(OpCode::Binary) => "BINARY",
            Some(OpCode::Close) => "CLOSE",
            Some(OpCode::Ping) => "PING",
            Some(OpCode::Pong) => "PONG",
            None => "?",
        };
        let body = self.body.bind(py);
        let shown = if body.as_bytes().len() > 60 {
            format!(
                "{}...({} bytes)",
                PyBytes::new(py, &body.as_bytes()[..60]).repr()?,
                body.as_bytes().len()
            )
        } else {
            body.repr()?.to_string()
        };
        Ok(format!("Message(Opcode.{name}, {shown})"))
    }

    fn __eq__(&self, py: Python<'_>, other: &Bound<'_, PyAny>) -> bool {
        match other.cast::<Message>() {
            Ok(o) => {
                let o = o.get();
                o.opcode == self.opcode
                    && o.body.bind(py).as_bytes() == self.body.bind(py).as_bytes()
            }
            Err(_) => false,
        }
    }

    fn __hash__(&self, py: Python<'_>) -> PyResult<isize> {
        PyTuple::new(
            py,
            [
                self.opcode.into_pyobject(py)?.into_any(),
                self.body.bind(py).clone().into_any(),
            ],
        )?
        .hash()
    }
}

pub(super) fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "object".into())
}

pub(super) fn make_message(py: Python<'_>, m: InMsg) -> PyResult<Py<PyAny>> {
    assert_unlocked("building a Message");
    let body = PyBytes::new(py, m.payload()).unbind();
    drop(m.data);
    Ok(Py::new(
        py,
        Message {
            opcode: m.opcode.as_u8(),
            body,
        },
    )?
    .into_any())
}

/// The `lightws.Opcode` member for `op` (None for an unknown one).
pub(super) fn opcode_object(py: Python<'_>, op: u8) -> PyResult<Py<PyAny>> {
    Ok(api(py)?.opcodes[op as usize]
        .as_ref()
        .map(|o| o.clone_ref(py))
        .unwrap_or_else(|| py.None()))
}

/// `(opcode, chunk, fin)` for `conn.reader()`.
pub(super) fn make_chunk(py: Python<'_>, m: InMsg) -> PyResult<Py<PyAny>> {
    let fin = match m.part {
        Part::Whole => true,
        Part::Chunk { fin } => fin,
    };
    assert_unlocked("building a chunk");
    let op = opcode_object(py, m.opcode.as_u8())?;
    let body = PyBytes::new(py, m.payload());
    Ok((op, body, fin).into_pyobject(py)?.into_any().unbind())
}
