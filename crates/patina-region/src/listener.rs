//! Admission of client connections. The agent holds at most `max_connections` at once; each
//! must send a byte within the handshake timeout or is closed; and one over the limit is
//! told so with a gRPC `RESOURCE_EXHAUSTED` by a tiny second server, then closed, rather
//! than left to hang in the kernel's accept queue. That refusal path is bounded too.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use patina_trust::server::Accepted;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::transport::server::Connected;

use crate::Limits;

/// Connections over the limit that are being told so at once. Each costs a descriptor and a
/// task for [`OVERFLOW_LINGER`]; beyond these the agent closes new connections unanswered, so
/// a flood can never grow the refusal path itself.
pub const MAX_OVERFLOW_CONNECTIONS: usize = 64;
/// How long a refused connection stays open: time for a client to send its calls and read
/// the status, short enough that [`MAX_OVERFLOW_CONNECTIONS`] turn over quickly.
pub const OVERFLOW_LINGER: Duration = Duration::from_secs(1);
/// Pause after an accept error that is not about one connection (out of descriptors or
/// memory): accepting again at once would spin, since the listener stays readable.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// At most one warning per this interval about refused connections, with a count: a flood
/// must not become a flood of log lines.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// An accepted client connection. It holds one connection slot until dropped, and fails its
/// reads with `TimedOut` if the client has sent nothing within the handshake timeout, so the
/// HTTP/2 server closes it.
pub struct Connection {
    io: TcpStream,
    /// Until the first byte arrives: when the client must have sent it by.
    first_byte_by: Option<Pin<Box<Sleep>>>,
    /// Released on drop, whoever drops the connection and however it ended.
    _slot: OwnedSemaphorePermit,
    /// When it was accepted: services bound its streams by its age.
    accepted: std::time::Instant,
    /// Counted among the agent's open connections while it lives (admitted ones only).
    _counted: Option<crate::limits::Held>,
}

impl Connection {
    fn new(io: TcpStream, slot: OwnedSemaphorePermit, handshake_timeout: Duration) -> Connection {
        Connection {
            io,
            first_byte_by: Some(Box::pin(tokio::time::sleep(handshake_timeout))),
            _slot: slot,
            accepted: std::time::Instant::now(),
            _counted: None,
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Some(deadline) = this.first_byte_by.as_mut() {
            match &polled {
                Poll::Ready(Ok(())) if buf.filled().len() > before => this.first_byte_by = None,
                // End of stream or an error: the server sees it as it is.
                Poll::Ready(_) => {}
                // Polling the deadline here also registers the waker that ends the wait.
                Poll::Pending => {
                    if deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the client sent nothing within the handshake timeout",
                        )));
                    }
                }
            }
        }
        polled
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Connected for Connection {
    type ConnectInfo = Accepted;

    fn connect_info(&self) -> Accepted {
        Accepted {
            tcp: self.io.connect_info(),
            at: self.accepted,
        }
    }
}

/// Admit connections from `listener` within `limits`. The first half is the accepted
/// connections for the agent's server; the second serves the refused ones and must run
/// beside it. It stops once the first half is dropped and its connections have closed.
pub fn admit(listener: TcpListener, limits: &Limits) -> (Incoming, Overflow) {
    let (tx, rx) = mpsc::channel(MAX_OVERFLOW_CONNECTIONS);
    let incoming = Incoming {
        listener,
        slots: Arc::new(Semaphore::new(limits.max_connections.get())),
        max_connections: limits.max_connections.get(),
        handshake_timeout: limits.handshake_timeout,
        overflow_slots: Arc::new(Semaphore::new(MAX_OVERFLOW_CONNECTIONS)),
        overflow: tx,
        backoff: None,
        refusals: Refusals::default(),
        occupancy: limits.occupancy,
    };
    let overflow = Overflow {
        refused: rx,
        max_connections: limits.max_connections.get(),
    };
    (incoming, overflow)
}

/// The accepted connections, each holding a slot: a stream for
/// `tonic::transport::Server::serve_with_incoming_shutdown`. Connections over the limit
/// never come out of it; they go to the [`Overflow`] server, or are closed.
pub struct Incoming {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    max_connections: usize,
    handshake_timeout: Duration,
    overflow_slots: Arc<Semaphore>,
    overflow: mpsc::Sender<Connection>,
    /// Set after an accept error that would repeat at once.
    backoff: Option<Pin<Box<Sleep>>>,
    refusals: Refusals,
    occupancy: crate::limits::Occupancy,
}

/// Refused connections not yet reported in the log.
#[derive(Default)]
struct Refusals {
    unreported: u64,
    last_report: Option<Instant>,
}

impl Incoming {
    fn admit(&mut self, io: TcpStream, peer: SocketAddr) -> Option<Connection> {
        // Nagle's algorithm plus delayed ACKs would hold small responses for ~40 ms.
        if let Err(e) = io.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "could not set TCP_NODELAY");
        }
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => {
                let mut c = Connection::new(io, slot, self.handshake_timeout);
                c._counted = Some(self.occupancy.hold(|c| &c.connections));
                Some(c)
            }
            Err(_) => {
                self.refuse(io, peer);
                None
            }
        }
    }

    /// Over the limit: hand the connection to the overflow server to be told so, or, when
    /// that is full too, close it at once.
    fn refuse(&mut self, io: TcpStream, peer: SocketAddr) {
        self.refusals.unreported += 1;
        let now = Instant::now();
        let due = self
            .refusals
            .last_report
            .is_none_or(|t| now.duration_since(t) >= REFUSAL_LOG_INTERVAL);
        if due {
            tracing::warn!(
                refused = self.refusals.unreported,
                max_connections = self.max_connections,
                last_peer = %peer,
                "refusing connections over limits.max_connections"
            );
            self.refusals = Refusals {
                unreported: 0,
                last_report: Some(now),
            };
        }
        if let Ok(slot) = self.overflow_slots.clone().try_acquire_owned() {
            // The channel holds at most as many connections as there are overflow slots, so
            // this fails only if the overflow server has stopped; dropping closes the socket.
            let _ = self
                .overflow
                .try_send(Connection::new(io, slot, OVERFLOW_LINGER));
        }
    }
}

/// Accept errors about one connection (it went away before we took it): take the next one.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

impl Stream for Incoming {
    type Item = Result<Connection, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        // Refused connections are handled here without returning; tokio's cooperative
        // budget in `poll_accept` still makes a flood of them yield to other tasks.
        loop {
            if let Some(backoff) = this.backoff.as_mut() {
                ready!(backoff.as_mut().poll(cx));
                this.backoff = None;
            }
            match ready!(this.listener.poll_accept(cx)) {
                Ok((io, peer)) => {
                    if let Some(conn) = this.admit(io, peer) {
                        return Poll::Ready(Some(Ok(conn)));
                    }
                }
                Err(e) if is_per_connection(&e) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed; pausing accepts");
                    this.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_ERROR_BACKOFF)));
                }
            }
        }
    }
}

/// The server for refused connections: every call on them is answered
/// `RESOURCE_EXHAUSTED`, and each is closed after [`OVERFLOW_LINGER`].
pub struct Overflow {
    refused: mpsc::Receiver<Connection>,
    max_connections: usize,
}

impl Overflow {
    /// Serve refused connections until [`Incoming`] is dropped or `stop` resolves, then wait
    /// for them to close (at most [`OVERFLOW_LINGER`]).
    /// With `tls`, refused connections are told over TLS too (their handshake bounded by
    /// [`OVERFLOW_LINGER`]).
    pub async fn serve(self, stop: impl Future<Output = ()>, tls: Option<patina_trust::Trust>) {
        use tokio_stream::StreamExt;
        let incoming =
            tokio_stream::wrappers::ReceiverStream::new(self.refused).map(Ok::<_, Infallible>);
        let server = tonic::transport::Server::builder()
            // No grace: the connection is dropped at OVERFLOW_LINGER whatever the client does.
            .max_connection_age(OVERFLOW_LINGER)
            .max_connection_age_grace(Duration::ZERO);
        let refuse = TooManyConnections {
            max: self.max_connections,
        };
        let served = match tls {
            None => {
                server
                    .serve_with_incoming_shutdown(refuse, incoming, stop)
                    .await
            }
            Some(trust) => {
                let incoming = patina_trust::TlsIncoming::new(incoming, trust, OVERFLOW_LINGER);
                server
                    .serve_with_incoming_shutdown(refuse, incoming, stop)
                    .await
            }
        };
        if let Err(e) = served {
            tracing::error!(error = %e, "the server for refused connections stopped");
        }
    }
}

/// Answers any call with `RESOURCE_EXHAUSTED`.
#[derive(Clone, Copy)]
struct TooManyConnections {
    max: usize,
}

impl tonic::codegen::Service<http::Request<Body>> for TooManyConnections {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<http::Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<Body>) -> Self::Future {
        let status = Status::resource_exhausted(format!(
            "too many connections: this agent serves at most {} at once; retry later or use another agent",
            self.max
        ));
        std::future::ready(Ok(status.into_http()))
    }
}
