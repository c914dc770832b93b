//! The operator's listener admits a bounded number of connections, each for a bounded time:
//! it is plain HTTP on an address monitoring reaches, and a client that opens connections
//! and sends nothing (or sends slowly) must not hold the agent's file descriptors.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Connections open at once: scrapers, probes and a few operators.
pub const MAX_CONNECTIONS: usize = 64;
/// A connection is closed this long after it was accepted (a scraper reconnects).
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// A [`TcpListener`] that waits for a free slot before it accepts.
pub struct Limited {
    inner: TcpListener,
    slots: Arc<Semaphore>,
}

impl Limited {
    pub fn new(inner: TcpListener) -> Limited {
        Limited {
            inner,
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }
}

/// An admitted connection: its slot, released when it closes, and the time it must close by.
pub struct Admitted {
    io: TcpStream,
    _slot: OwnedSemaphorePermit,
    closes: Pin<Box<Sleep>>,
}

impl Admitted {
    /// Past its age the connection reads end of stream and writes fail: the server closes it.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.closes.as_mut().poll(cx).is_ready()
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.expired(cx) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.expired(cx) {
            return Poll::Ready(Err(io::ErrorKind::TimedOut.into()));
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl axum::serve::Listener for Limited {
    type Io = Admitted;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Admitted, std::net::SocketAddr) {
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the listener's semaphore is never closed");
        loop {
            match self.inner.accept().await {
                Ok((io, addr)) => {
                    return (
                        Admitted {
                            io,
                            _slot: slot,
                            closes: Box::pin(tokio::time::sleep_until(
                                Instant::now() + MAX_CONNECTION_AGE,
                            )),
                        },
                        addr,
                    );
                }
                // Out of descriptors, or a connection reset before it was taken: try again
                // shortly rather than spin.
                Err(e) => {
                    tracing::debug!(error = %e, "the operator's listener could not accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }
}
