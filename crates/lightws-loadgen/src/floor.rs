//! The floor server: the least a WebSocket echo server can do on one thread.
//!
//! One thread, one level-triggered epoll set, non-blocking sockets, no
//! runtime, no Python. It parses the upgrade with [`lightws_proto::handshake`], decodes
//! with [`lightws_proto::frame`] (unmasking in place, validating UTF-8 like lightws),
//! and echoes each whole message as one unmasked frame. `bench/compare.py`
//! runs it next to the Python servers so that every ratio can be read against
//! what the kernel and the codec alone cost.
//!
//! Reads go into one 64 KiB scratch buffer shared by all connections; only a
//! partial frame or message left over is copied into the connection, and an
//! idle connection holds no buffer at all.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use lightws_proto::frame::{self, Decoder, Event, OpCode, Role};
use lightws_proto::handshake::{self, Upgrade};

const LISTENER: u64 = u64::MAX;
const SCRATCH: usize = 64 * 1024;
const MAX_HEAD: usize = 16 * 1024;

struct Conn {
    stream: TcpStream,
    /// Bytes not yet decoded (partial head or frame), usually empty.
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    dec: Option<Decoder>,
    /// The message being assembled when it spans reads or frames.
    msg: Vec<u8>,
    /// Close after `out` is flushed.
    closing: bool,
    /// EPOLLOUT is registered.
    want_write: bool,
}

/// Serve on `addr` (`host:port`, or a `ws://host:port/` URL) until
/// `interrupted` returns true (checked at least every 200 ms).
///
/// # Errors
///
/// Binding or epoll failures.
pub fn serve(addr: &str, announce: bool, interrupted: &dyn Fn() -> bool) -> io::Result<()> {
    let addr = addr
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .to_string();
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "expected host:port"))?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    let listener: TcpListener = socket.into();
    listener.set_nonblocking(true)?;
    if announce {
        println!("floor server listening on ws://{}/", listener.local_addr()?);
    }
    let ep = Epoll::new()?;
    ep.add(listener.as_raw_fd(), libc::EPOLLIN as u32, LISTENER)?;
    let mut conns: HashMap<u64, Conn> = HashMap::new();
    let mut next_token: u64 = 0;
    let mut scratch = vec![0u8; SCRATCH];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    loop {
        if interrupted() {
            return Ok(());
        }
        let n = ep.wait(&mut events, 200)?;
        for ev in &events[..n] {
            let (flags, token) = (ev.events, ev.u64);
            if token == LISTENER {
                loop {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            stream.set_nonblocking(true)?;
                            stream.set_nodelay(true)?;
                            let token = next_token;
                            next_token += 1;
                            ep.add(stream.as_raw_fd(), libc::EPOLLIN as u32, token)?;
                            conns.insert(
                                token,
                                Conn {
                                    stream,
                                    inbuf: Vec::new(),
                                    out: Vec::new(),
                                    out_pos: 0,
                                    dec: None,
                                    msg: Vec::new(),
                                    closing: false,
                                    want_write: false,
                                },
                            );
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        // Out of descriptors and the like: try again on the next event.
                        Err(_) => break,
                    }
                }
                continue;
            }
            let Some(conn) = conns.get_mut(&token) else {
                continue;
            };
            let mut alive = true;
            if flags & (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                alive = on_readable(conn, &mut scratch);
            }
            if alive {
                alive = flush(conn);
            }
            if alive {
                let want = conn.out_pos < conn.out.len();
                if want != conn.want_write {
                    let mut interest = libc::EPOLLIN as u32;
                    if want {
                        interest |= libc::EPOLLOUT as u32;
                    }
                    ep.modify(conn.stream.as_raw_fd(), interest, token)?;
                    conn.want_write = want;
                }
            }
            if !alive {
                // Closing the socket removes it from the epoll set.
                conns.remove(&token);
            }
        }
    }
}

/// Read everything available and act on it. `false`: drop the connection.
fn on_readable(conn: &mut Conn, scratch: &mut [u8]) -> bool {
    loop {
        let n = match conn.stream.read(scratch) {
            Ok(0) => return false,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return false,
        };
        if conn.closing {
            continue;
        }
        let ok = if conn.inbuf.is_empty() {
            let used = handle(conn, &mut scratch[..n]);
            used.map(|used| conn.inbuf.extend_from_slice(&scratch[used..n]))
        } else {
            conn.inbuf.extend_from_slice(&scratch[..n]);
            let mut buf = std::mem::take(&mut conn.inbuf);
            let used = handle(conn, &mut buf);
            used.map(|used| {
                buf.drain(..used);
                conn.inbuf = buf;
            })
        };
        if ok.is_none() {
            return false;
        }
        if conn.inbuf.is_empty() && conn.inbuf.capacity() > 0 {
            conn.inbuf = Vec::new();
        }
        if n < scratch.len() {
            // Level-triggered: anything left is reported again.
            return true;
        }
    }
}

/// Consume what it can of `buf`; returns how much, or `None` to drop.
fn handle(conn: &mut Conn, buf: &mut [u8]) -> Option<usize> {
    let mut pos = 0;
    if conn.dec.is_none() {
        match handshake::parse_request(buf, MAX_HEAD) {
            Ok(None) => return Some(0),
            Ok(Some((req, head))) => {
                pos = head;
                match handshake::validate(&req) {
                    Upgrade::WebSocket { key, .. } => {
                        handshake::write_accept(&mut conn.out, &key, None, &[]);
                        conn.dec = Some(Decoder::new(Role::Server, None));
                    }
                    Upgrade::NotUpgrade => {
                        handshake::write_response(&mut conn.out, 400, &[], b"WebSocket only");
                        conn.closing = true;
                        return Some(buf.len());
                    }
                    Upgrade::Reject(r) => {
                        r.write_to(&mut conn.out);
                        conn.closing = true;
                        return Some(buf.len());
                    }
                }
            }
            Err(e) => {
                e.rejection().write_to(&mut conn.out);
                conn.closing = true;
                return Some(buf.len());
            }
        }
    }
    let dec = conn.dec.as_mut()?;
    while pos < buf.len() {
        let (n, event) = match dec.decode(&mut buf[pos..]) {
            Ok(r) => r,
            Err(e) => {
                let payload = frame::close_payload(Some(e.close_code()), "");
                frame::encode_frame(&mut conn.out, true, OpCode::Close, &payload, None);
                conn.closing = true;
                return Some(buf.len());
            }
        };
        if n == 0 {
            break;
        }
        pos += n;
        match event {
            None => {}
            Some(Event::Data {
                opcode,
                payload,
                first,
                fin,
            }) => {
                if first && fin {
                    frame::encode_frame(&mut conn.out, true, opcode, payload, None);
                } else {
                    conn.msg.extend_from_slice(payload);
                    if fin {
                        frame::encode_frame(&mut conn.out, true, opcode, &conn.msg, None);
                        conn.msg = Vec::new();
                    }
                }
            }
            Some(Event::Ping(p)) => {
                frame::encode_frame(&mut conn.out, true, OpCode::Pong, p, None);
            }
            Some(Event::Pong(_)) => {}
            Some(Event::Close { code, .. }) => {
                // RFC 6455 5.5.1: answer with a close frame echoing the code.
                let payload = frame::close_payload(code, "");
                frame::encode_frame(&mut conn.out, true, OpCode::Close, &payload, None);
                conn.closing = true;
                return Some(buf.len());
            }
        }
    }
    Some(pos)
}

/// Write what is queued. `false`: drop the connection.
fn flush(conn: &mut Conn) -> bool {
    while conn.out_pos < conn.out.len() {
        match conn.stream.write(&conn.out[conn.out_pos..]) {
            Ok(n) => conn.out_pos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    conn.out_pos = 0;
    if conn.out.capacity() > SCRATCH {
        conn.out = Vec::new();
    } else {
        conn.out.clear();
    }
    if conn.closing {
        let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        return false;
    }
    true
}

/// A minimal epoll wrapper.
struct Epoll(std::os::fd::OwnedFd);

impl Epoll {
    fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall, result checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor we own.
        Ok(Epoll(unsafe {
            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }

    fn ctl(&self, op: libc::c_int, fd: i32, events: u32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: valid epoll fd and event pointer.
        if unsafe { libc::epoll_ctl(self.0.as_raw_fd(), op, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn add(&self, fd: i32, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, events, token)
    }

    fn modify(&self, fd: i32, events: u32, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, events, token)
    }

    fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> io::Result<usize> {
        // SAFETY: the buffer holds events.len() entries.
        let n = unsafe {
            libc::epoll_wait(
                self.0.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(n as usize)
    }
}
