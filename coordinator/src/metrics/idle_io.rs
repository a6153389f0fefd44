//! A bound on how long the metrics endpoint waits for a client: a connection that sends
//! nothing for [`IDLE_TIMEOUT`] (no request, or half a request header) is closed. axum's
//! server sets no header-read timeout of its own, so without this a client that connects and
//! stays silent would hold its connection and task for as long as the coordinator runs.
//! Prometheus keeps its scrape connection open between scrapes; when this closes it, the next
//! scrape simply connects again.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

/// How long a metrics connection may send nothing before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A TCP listener whose connections end after `timeout` without a byte from the client.
pub struct IdleTimeoutListener {
    inner: TcpListener,
    timeout: Duration,
}

impl IdleTimeoutListener {
    pub fn new(inner: TcpListener, timeout: Duration) -> Self {
        Self { inner, timeout }
    }
}

impl axum::serve::Listener for IdleTimeoutListener {
    type Io = IdleTimeoutIo;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (IdleTimeoutIo::new(stream, self.timeout), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A TCP stream whose reads fail with `TimedOut` once the client has sent nothing for the
/// timeout; writes pass through.
pub struct IdleTimeoutIo {
    inner: TcpStream,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl IdleTimeoutIo {
    fn new(inner: TcpStream, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl AsyncRead for IdleTimeoutIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(result) => {
                this.deadline.as_mut().reset(Instant::now() + this.timeout);
                Poll::Ready(result)
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "the metrics client sent nothing for {} s",
                        this.timeout.as_secs()
                    ),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for IdleTimeoutIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn serve_with(timeout: Duration) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route("/metrics", axum::routing::get(|| async { "ok\n" }));
        tokio::spawn(async move {
            axum::serve(IdleTimeoutListener::new(listener, timeout), app)
                .await
                .unwrap();
        });
        addr
    }

    /// A client that connects and sends nothing is disconnected by the server; without the
    /// bound the read below would wait for the guard (and the test would fail).
    #[tokio::test]
    async fn a_silent_client_is_disconnected() {
        let addr = serve_with(Duration::from_millis(300)).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut buf))
            .await
            .expect("the server kept a silent connection open: no idle bound");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "expected the server to close, got {read:?}"
        );
    }

    /// A client that sends half a request header and stops is disconnected too, and a proper
    /// request is still answered.
    #[tokio::test]
    async fn a_stalled_header_is_cut_and_requests_still_served() {
        let addr = serve_with(Duration::from_millis(300)).await;
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled
            .write_all(b"GET /metrics HTTP/1.1\r\nHo")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(20), stalled.read(&mut buf))
            .await
            .expect("the server kept a half-sent request open");
        assert!(matches!(read, Ok(0) | Err(_)), "got {read:?}");

        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(20), client.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok\n"), "{answer}");
    }
}
