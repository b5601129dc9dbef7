//! The host's event loop: every listener and every guest connection on one thread.
//!
//! Why an event loop and not a thread per connection: a thread costs a stack and a kernel
//! task, so 10,000 idle guests cost 10,000 threads, and a host under a pids limit cannot
//! spawn one more (the agent used to abort there). Here a connection is a task of a few
//! hundred bytes plus its buffers on a single-threaded tokio runtime (tokio rather than a
//! hand-written epoll loop: write deadlines, HELLO deadlines, the slow-host fault and
//! bundles larger than a socket buffer are timers and back-pressure that the runtime gives
//! for free), so the agent runs a fixed handful of threads whatever the guests do.
//!
//! What one guest can take is bounded: [`Limits::max_per_guest`] connections per socket or
//! CID, a HELLO within [`Limits::hello_timeout`], a write deadline; and all guests together
//! at most [`Limits::max_connections`] (by default what the open-file limit allows less a
//! reserve). At that cap, or when accept() fails for want of descriptors or memory, the
//! connections that have not said HELLO are closed first, oldest first — a well-behaved
//! guest says HELLO at once, so a flood of idle connections cannot lock it out. Accept errors
//! with nothing to close back off (10 ms doubling to 1 s); every repeated problem is reported once per
//! [`Limits::report_interval`] with a count, never in a loop.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read as _, Write as _};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bootlace_contract::protocol::{Decoder, Frame, ProtocolError};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;

use crate::host::{
    encode, ConnectionError, Event, Host, Limits, Out, Session, Writing, FD_RESERVE,
};
use crate::resolve::Transport;
use crate::status::Counters;

/// First and longest pause after a failed accept().
const MIN_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Read buffer per connection (frames are small; a bundle is written, never read, here).
const READ_CHUNK: usize = 512;

/// The event loop's state, part of a [`Host`].
#[derive(Debug, Default)]
pub(crate) struct Server {
    runtime: Mutex<Option<tokio::runtime::Handle>>,
    conns: Mutex<Conns>,
    listeners: Mutex<HashMap<PathBuf, tokio::task::AbortHandle>>,
    reports: Mutex<HashMap<String, Throttle>>,
    /// Woken when a connection closes: listeners backing off for want of descriptors try
    /// again at once rather than at the end of their back-off.
    freed: Notify,
}

#[derive(Debug, Default)]
struct Conns {
    open: usize,
    by_guest: HashMap<String, u32>,
    /// Connections that have not said HELLO, oldest first (the ones closed to make room).
    pending: BTreeMap<u64, Arc<Notify>>,
    next_id: u64,
    counters: Counters,
    /// The open-file limit, read once.
    nofile: Option<usize>,
}

#[derive(Debug)]
struct Throttle {
    last: Instant,
    suppressed: u64,
}

/// A connection's place in the accounting, given back when it is dropped.
struct Ticket {
    host: Arc<Host>,
    id: u64,
    guest: String,
    evict: Arc<Notify>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // The connection's descriptor is closed by now (`connection` drops the stream first).
        self.host.server.freed.notify_waiters();
        let mut c = self.host.server.lock_conns();
        c.open = c.open.saturating_sub(1);
        c.counters.connections_open = c.open as u64;
        c.pending.remove(&self.id);
        if let Some(n) = c.by_guest.get_mut(&self.guest) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.by_guest.remove(&self.guest);
            }
        }
    }
}

impl Ticket {
    /// The guest said HELLO: no longer among the first to be closed.
    fn said_hello(&self) {
        self.host.server.lock_conns().pending.remove(&self.id);
    }
}

impl Server {
    fn lock_conns(&self) -> std::sync::MutexGuard<'_, Conns> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The counters, for the status table.
    pub(crate) fn counters(&self) -> Counters {
        let mut c = self.lock_conns().counters;
        c.listeners = self
            .listeners
            .lock()
            .map(|l| l.len() as u64)
            .unwrap_or_default();
        c
    }

    /// The runtime, started on its own thread the first time.
    fn runtime(&self) -> io::Result<tokio::runtime::Handle> {
        let mut rt = self.runtime.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = rt.as_ref() {
            return Ok(h.clone());
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let handle = runtime.handle().clone();
        std::thread::Builder::new()
            .name("bootlace-agent-io".to_owned())
            .spawn(move || runtime.block_on(std::future::pending::<()>()))?;
        *rt = Some(handle.clone());
        Ok(handle)
    }

    /// Reports `message` about `about` now, or counts it if one was reported less than an
    /// interval ago (the next report says how many were not).
    pub(crate) fn report(&self, host: &Host, about: &str, key: &str, message: String) {
        let interval = host.limits.report_interval;
        let now = Instant::now();
        let suppressed = {
            let mut r = self.reports.lock().unwrap_or_else(|p| p.into_inner());
            if r.len() > 4096 {
                r.retain(|_, t| now.duration_since(t.last) < interval);
            }
            match r.get_mut(key) {
                Some(t) if now.duration_since(t.last) < interval => {
                    t.suppressed += 1;
                    return;
                }
                Some(t) => {
                    let s = t.suppressed;
                    *t = Throttle {
                        last: now,
                        suppressed: 0,
                    };
                    s
                }
                None => {
                    r.insert(
                        key.to_owned(),
                        Throttle {
                            last: now,
                            suppressed: 0,
                        },
                    );
                    0
                }
            }
        };
        let text = if suppressed > 0 {
            format!(
                "{message} ({suppressed} more like it in the last {} s)",
                interval.as_secs()
            )
        } else {
            message
        };
        host.emit(None, about, Event::Notice(text));
    }

    /// The global cap: the configured one, or what the open-file limit leaves.
    fn cap(&self, c: &mut Conns, limits: &Limits) -> usize {
        if limits.max_connections > 0 {
            return limits.max_connections;
        }
        let nofile = *c.nofile.get_or_insert_with(|| {
            rustix::process::getrlimit(rustix::process::Resource::Nofile)
                .current
                .map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX))
        });
        let listeners = self.listeners.lock().map(|l| l.len()).unwrap_or_default();
        nofile.saturating_sub(FD_RESERVE + listeners).max(1)
    }

    /// Closes the oldest connection that has not said HELLO; whether there was one.
    fn evict_one(c: &mut Conns) -> bool {
        match c.pending.pop_first() {
            Some((_, n)) => {
                n.notify_one();
                c.counters.evicted += 1;
                true
            }
            None => false,
        }
    }
}

/// Takes a new connection of `guest` into the accounting, or refuses it (and says why, once
/// per interval).
fn admit(host: &Arc<Host>, guest: &str) -> Option<Ticket> {
    let server = &host.server;
    let refusal = {
        let mut c = server.lock_conns();
        let cap = server.cap(&mut c, &host.limits);
        let mine = c.by_guest.get(guest).copied().unwrap_or(0);
        if mine >= host.limits.max_per_guest {
            c.counters.refused_per_guest += 1;
            Some((
                format!("refused {guest}"),
                format!(
                    "{mine} connections open (the per-guest cap): further ones are closed at once"
                ),
            ))
        } else if c.open >= cap && !Server::evict_one(&mut c) {
            c.counters.refused_global += 1;
            // The host's cap, not this guest's doing: one report for all guests.
            Some((
                "refused: the global cap".to_owned(),
                format!(
                    "the host holds {} connections (its cap of {cap}), none of them before \
                     HELLO: new ones are closed at once",
                    c.open
                ),
            ))
        } else {
            let id = c.next_id;
            c.next_id += 1;
            c.open += 1;
            c.counters.connections_open = c.open as u64;
            c.counters.connections_accepted += 1;
            *c.by_guest.entry(guest.to_owned()).or_default() += 1;
            let evict = Arc::new(Notify::new());
            c.pending.insert(id, Arc::clone(&evict));
            return Some(Ticket {
                host: Arc::clone(host),
                id,
                guest: guest.to_owned(),
                evict,
            });
        }
    };
    if let Some((key, why)) = refusal {
        server.report(host, guest, &key, why);
    }
    None
}

/// After a failed accept(): counts it, reports it once per interval, and either frees a
/// descriptor (when they ran out and a silent connection can be closed: the next accept() is
/// tried as soon as it is gone) or waits `backoff`; the next backoff.
async fn accept_failed(
    host: &Arc<Host>,
    listener: &str,
    e: &io::Error,
    backoff: Duration,
) -> Duration {
    let starved = matches!(
        e.raw_os_error(),
        Some(libc_errno::EMFILE | libc_errno::ENFILE | libc_errno::ENOMEM | libc_errno::ENOBUFS)
    );
    let freed = {
        let mut c = host.server.lock_conns();
        c.counters.accept_errors += 1;
        starved && Server::evict_one(&mut c)
    };
    let wait = if starved { backoff } else { MIN_BACKOFF };
    let then = if freed {
        "closing a connection that has not said HELLO".to_owned()
    } else {
        format!("retrying in {} ms", wait.as_millis())
    };
    // One report per kind of error for all listeners together, not one per listener: out of
    // descriptors, every one of 10,000 listeners fails at once.
    host.server.report(
        host,
        listener,
        &format!("accept: {e}"),
        format!("accept failed: {e}; {then}"),
    );
    if freed {
        // The closed connection's task runs before this one is polled again.
        tokio::task::yield_now().await;
        return MIN_BACKOFF;
    }
    if starved {
        // Until the back-off ends or a connection closes, whichever comes first: every
        // listener waiting for a descriptor gets the next one's chance.
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = host.server.freed.notified() => return MIN_BACKOFF,
        }
        (backoff * 2).min(MAX_BACKOFF)
    } else {
        tokio::time::sleep(wait).await;
        MIN_BACKOFF
    }
}

/// The errno values accept() fails with when the host runs out of something.
mod libc_errno {
    pub const EMFILE: i32 = 24;
    pub const ENFILE: i32 = 23;
    pub const ENOMEM: i32 = 12;
    pub const ENOBUFS: i32 = 105;
}

/// Binds a Unix socket at `path`, replacing a stale socket (never another kind of file).
fn bind_unix(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket: not replaced",
                    path.display()
                ),
            ))
        }
        Err(_) => {}
    }
    let l = std::os::unix::net::UnixListener::bind(path)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Listens on the hybrid-vsock socket `path` (a listener already there is replaced).
pub(crate) fn listen_unix(host: &Arc<Host>, path: &Path) -> io::Result<()> {
    let rt = host.server.runtime()?;
    let std_listener = bind_unix(path)?;
    let listener = {
        let _entered = rt.enter();
        tokio::net::UnixListener::from_std(std_listener)?
    };
    let task = rt.spawn(accept_unix(Arc::clone(host), listener, path.to_owned()));
    let mut ls = host
        .server
        .listeners
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(old) = ls.insert(path.to_owned(), task.abort_handle()) {
        old.abort();
    }
    Ok(())
}

/// Stops listening on `path` and removes its socket; connections already open go on.
pub(crate) fn unlisten(host: &Host, path: &Path) {
    let removed = host
        .server
        .listeners
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(path);
    if let Some(task) = removed {
        task.abort();
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            let _ = std::fs::remove_file(path);
        }
    }
}

async fn accept_unix(host: Arc<Host>, listener: tokio::net::UnixListener, path: PathBuf) {
    let transport = Transport::Unix(path);
    let label = transport.label();
    let mut backoff = MIN_BACKOFF;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                backoff = MIN_BACKOFF;
                if let Some(ticket) = admit(&host, &label) {
                    tokio::spawn(connection(
                        Arc::clone(&host),
                        stream,
                        transport.clone(),
                        ticket,
                    ));
                }
            }
            Err(e) => backoff = accept_failed(&host, &label, &e, backoff).await,
        }
    }
}

/// Listens on AF_VSOCK `port`; a guest is its peer CID.
pub(crate) fn listen_vsock(host: &Arc<Host>, port: u32) -> io::Result<()> {
    let rt = host.server.runtime()?;
    let listener = vsock::VsockListener::bind_with_cid_port(vsock::VMADDR_CID_ANY, port)?;
    listener.set_nonblocking(true)?;
    let listener = {
        let _entered = rt.enter();
        register(listener)?
    };
    let label = format!("vsock:*:{port}");
    let task = rt.spawn(accept_vsock(Arc::clone(host), listener, label.clone()));
    host.server
        .listeners
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(PathBuf::from(label), task.abort_handle());
    Ok(())
}

async fn accept_vsock(host: Arc<Host>, listener: AsyncFd<vsock::VsockListener>, label: String) {
    let mut backoff = MIN_BACKOFF;
    loop {
        let accepted = match listener.readable().await {
            Ok(mut guard) => match guard.try_io(|l| l.get_ref().accept()) {
                Ok(r) => r,
                Err(_would_block) => continue,
            },
            Err(e) => Err(e),
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                backoff = accept_failed(&host, &label, &e, backoff).await;
                continue;
            }
        };
        backoff = MIN_BACKOFF;
        let transport = Transport::Vsock { cid: peer.cid() };
        let Some(ticket) = admit(&host, &transport.label()) else {
            continue;
        };
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| register(stream).map(VsockConn));
        match stream {
            Ok(s) => {
                tokio::spawn(connection(Arc::clone(&host), s, transport, ticket));
            }
            Err(e) => host.emit(
                None,
                &transport.label(),
                Event::Error(format!("vsock: {e}")),
            ),
        }
    }
}

/// `inner` on the event loop.
#[allow(unsafe_code)]
fn register<T: std::os::fd::AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `inner` (a vsock listener or stream) owns its descriptor, and the AsyncFd owns
    // `inner` from here on: nothing closes or replaces the descriptor while it is registered.
    unsafe { AsyncFd::register(inner) }.map_err(io::Error::from)
}

/// An AF_VSOCK connection on the event loop.
struct VsockConn(AsyncFd<vsock::VsockStream>);

impl AsyncRead for VsockConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let fd = &mut self.get_mut().0;
        loop {
            let mut guard = ready!(fd.poll_read_ready_mut(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|s| s.get_mut().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => {}
            }
        }
    }
}

impl AsyncWrite for VsockConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        let fd = &mut self.get_mut().0;
        loop {
            let mut guard = ready!(fd.poll_write_ready_mut(cx))?;
            match guard.try_io(|s| s.get_mut().write(bytes)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => {}
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// One connection, from accept to close.
async fn connection<S>(host: Arc<Host>, mut stream: S, transport: Transport, ticket: Ticket)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut s = Session::new(transport);
    host.open(&mut s);
    let r = if host.refuse_fault() {
        Err(ConnectionError::Fault("connection refused"))
    } else {
        converse(&host, &mut stream, &mut s, &ticket).await
    };
    drop(stream);
    if let Err(e) = r {
        host.emit(
            s.name.as_deref(),
            &s.guest,
            Event::Error(bootlace_contract::chain(&e)),
        );
    }
    drop(ticket);
    host.emit(s.name.as_deref(), &s.guest, Event::Disconnected);
}

async fn converse<S>(
    host: &Host,
    stream: &mut S,
    s: &mut Session,
    ticket: &Ticket,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut dec = Decoder::new();
    loop {
        let read = if s.boot_id.is_none() {
            let after = host.limits.hello_timeout;
            tokio::select! {
                r = tokio::time::timeout(after, read_frame(stream, &mut dec)) => {
                    r.map_err(|_| ConnectionError::NoHello { after })?
                }
                () = ticket.evict.notified() => return Err(ConnectionError::Evicted),
            }
        } else {
            read_frame(stream, &mut dec).await
        };
        let f = match read {
            Ok(f) => f,
            Err(ProtocolError::Closed { mid_frame: false }) => return Ok(()),
            Err(e) => return Err(ConnectionError::Read(e)),
        };
        let outs = host.step(s, f)?;
        if s.boot_id.is_some() {
            ticket.said_hello();
        }
        let mut failed = None;
        for o in outs {
            match o {
                Out::Emit(e) => host.emit(s.name.as_deref(), &s.guest, e),
                _ if failed.is_some() => {}
                Out::Frame(frame, what) => {
                    pause(host).await;
                    failed = write_frame(host, stream, &frame, &what).await.err();
                }
                Out::Bundle(b, header) => {
                    failed = send_bundle(host, stream, s, &b, &header).await.err();
                }
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
    }
}

async fn pause(host: &Host) {
    if let Some(d) = host.faults.delay {
        tokio::time::sleep(d).await;
    }
}

/// Reads the next frame through `dec` (which keeps what follows it).
async fn read_frame<S: AsyncRead + Unpin>(
    r: &mut S,
    dec: &mut Decoder,
) -> Result<Frame, ProtocolError> {
    let mut buf = [0u8; READ_CHUNK];
    loop {
        if let Some(f) = dec.next_frame()? {
            return Ok(f);
        }
        let want = dec.wanted().min(buf.len());
        let n = r
            .read(buf.get_mut(..want).unwrap_or(&mut []))
            .await
            .map_err(ProtocolError::Io)?;
        if n == 0 {
            return Err(ProtocolError::Closed {
                mid_frame: dec.is_mid_frame(),
            });
        }
        dec.push(buf.get(..n).unwrap_or(&[]));
    }
}

async fn write_frame<S: AsyncWrite + Unpin>(
    host: &Host,
    stream: &mut S,
    frame: &Frame,
    what: &Writing,
) -> Result<(), ConnectionError> {
    let bytes = encode(frame, what)?;
    write_all(host, stream, &bytes, |_| what.clone()).await
}

/// Writes all of `bytes`, each write within the write deadline.
async fn write_all<S: AsyncWrite + Unpin>(
    host: &Host,
    stream: &mut S,
    bytes: &[u8],
    what: impl Fn(u64) -> Writing,
) -> Result<(), ConnectionError> {
    let mut written = 0usize;
    while let Some(rest) = bytes.get(written..).filter(|r| !r.is_empty()) {
        match tokio::time::timeout(host.write_timeout, stream.write(rest)).await {
            Err(_elapsed) => {
                return Err(ConnectionError::WriteDeadline {
                    what: what(written as u64),
                    deadline: host.write_timeout,
                })
            }
            Ok(Ok(0)) => {
                return Err(host.write_failed(what(written as u64), io::ErrorKind::WriteZero.into()))
            }
            Ok(Ok(n)) => written += n,
            Ok(Err(e)) => return Err(host.write_failed(what(written as u64), e)),
        }
    }
    Ok(())
}

async fn send_bundle<S: AsyncWrite + Unpin>(
    host: &Host,
    stream: &mut S,
    s: &Session,
    b: &crate::bundle::BundleSource,
    header: &Frame,
) -> Result<(), ConnectionError> {
    pause(host).await;
    let started = Instant::now();
    write_frame(host, stream, header, &Writing::BundleHeader).await?;
    let (bytes, cut) = host.bundle_bytes(b);
    let size = bytes.len() as u64;
    let what = |written| Writing::BundleBytes { written, size };
    if let Some(n) = cut {
        write_all(host, stream, bytes.get(..n).unwrap_or_default(), what).await?;
        return Err(ConnectionError::Fault("dropped mid-bundle"));
    }
    write_all(host, stream, &bytes, what).await?;
    host.bundle_sent(s, b, size, started);
    Ok(())
}

/// Serves the status table on the Unix socket `path` (mode 0600): a request line `status`
/// (or nothing) gets the table as JSON, `metrics` gets Prometheus' text format.
pub(crate) fn listen_status(host: &Arc<Host>, path: &Path) -> io::Result<()> {
    let rt = host.server.runtime()?;
    let std_listener = bind_unix(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    let listener = {
        let _entered = rt.enter();
        tokio::net::UnixListener::from_std(std_listener)?
    };
    let host = Arc::clone(host);
    rt.spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(answer_status(Arc::clone(&host), stream));
                }
                Err(e) => {
                    let _ = accept_failed(&host, "status", &e, MAX_BACKOFF).await;
                }
            }
        }
    });
    Ok(())
}

async fn answer_status(host: Arc<Host>, mut stream: tokio::net::UnixStream) {
    let mut req = Vec::new();
    let mut byte = [0u8; 1];
    let deadline = Duration::from_secs(2);
    // The request is one short line; a client that says nothing (EOF) asks for the status.
    while req.len() < 64 {
        match tokio::time::timeout(deadline, stream.read(&mut byte)).await {
            Ok(Ok(1)) if byte != [b'\n'] => req.extend_from_slice(&byte),
            _ => break,
        }
    }
    let answer = match String::from_utf8_lossy(&req).trim() {
        "" | "status" => format!("{}\n", host.status()),
        "metrics" => host.metrics(),
        other => format!(
            "{{\"error\":{}}}\n",
            serde_json::Value::String(format!("unknown request {other:?}: status or metrics"))
        ),
    };
    let _ = tokio::time::timeout(deadline, stream.write_all(answer.as_bytes())).await;
}

/// Serves `GET /metrics` (Prometheus' text format) over HTTP on `addr`; any other path is a
/// 404. One request per connection, read within 2 s, at most 8 KiB of request.
pub(crate) fn listen_metrics(
    host: &Arc<Host>,
    addr: std::net::SocketAddr,
) -> io::Result<std::net::SocketAddr> {
    let rt = host.server.runtime()?;
    let std_listener = std::net::TcpListener::bind(addr)?;
    std_listener.set_nonblocking(true)?;
    let local = std_listener.local_addr()?;
    let listener = {
        let _entered = rt.enter();
        tokio::net::TcpListener::from_std(std_listener)?
    };
    let host = Arc::clone(host);
    rt.spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(answer_http(Arc::clone(&host), stream));
                }
                Err(e) => {
                    let _ = accept_failed(&host, "metrics", &e, MAX_BACKOFF).await;
                }
            }
        }
    });
    Ok(local)
}

async fn answer_http(host: Arc<Host>, mut stream: tokio::net::TcpStream) {
    let deadline = Duration::from_secs(2);
    let mut req = Vec::new();
    let mut chunk = [0u8; 512];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
        match tokio::time::timeout(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => req.extend_from_slice(chunk.get(..n).unwrap_or_default()),
            _ => break,
        }
    }
    let line = String::from_utf8_lossy(&req);
    let mut words = line.split_whitespace();
    let (status, body) = match (words.next(), words.next()) {
        (Some("GET"), Some("/metrics")) => ("200 OK", host.metrics()),
        _ => ("404 Not Found", "GET /metrics\n".to_owned()),
    };
    let answer = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(deadline, stream.write_all(answer.as_bytes())).await;
}
