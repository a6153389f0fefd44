//! The coordinator's TLS acceptor: accepts TCP connections, runs each TLS handshake on its own
//! task with a time limit and a per-connection config ([`AuditedServerTls`]), hands finished
//! connections to tonic, and reports each refused client certificate, with the peer's address,
//! to the refusal auditor. It replaces tonic's own acceptor, which drops a refused handshake
//! without telling anyone. Each connection is counted open until hyper drops it
//! (`fedinspect_tls_connections_open`), which shows when a stalled peer was let go.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use fedinspect_common::tls::{AuditedServerTls, CertificateRefusal};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tracing::Instrument;

use crate::metrics::Metrics;

/// Handshakes in progress at once; further connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 256;

/// A finished connection, as tonic's `serve_with_incoming` takes it.
pub type Accepted = Result<Connection, io::Error>;

/// A connection after its handshake, counted open until dropped. Its connect info is the
/// TLS stream's, so `Request::peer_certs` works as with tonic's own acceptor.
pub struct Connection {
    inner: TlsStream<TcpStream>,
    metrics: Arc<Metrics>,
}

/// A refused client certificate and who presented it.
#[derive(Clone, Debug)]
pub struct Refused {
    pub peer: SocketAddr,
    pub refusal: CertificateRefusal,
}

/// What the acceptor needs: the TLS configs, how long a handshake may take, where refusals go.
pub struct Acceptor {
    pub tls: AuditedServerTls,
    pub handshake_timeout: Duration,
    pub refusals: mpsc::Sender<Refused>,
    pub metrics: Arc<Metrics>,
}

impl Acceptor {
    /// Accepts on `listener` until `stop` turns true; the stream of finished connections ends
    /// with it.
    pub fn spawn(
        self,
        listener: TcpListener,
        stop: watch::Receiver<bool>,
    ) -> (ReceiverStream<Accepted>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(
            self.run(listener, tx, stop)
                .instrument(tracing::info_span!("tls_accept")),
        );
        (ReceiverStream::new(rx), task)
    }

    async fn run(
        self,
        listener: TcpListener,
        tx: mpsc::Sender<Accepted>,
        mut stop: watch::Receiver<bool>,
    ) {
        let this = Arc::new(self);
        let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let permit = tokio::select! {
                _ = stopped(&mut stop) => return,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let (tcp, peer) = tokio::select! {
                _ = stopped(&mut stop) => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let this = this.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(stream) = this.handshake(tcp, peer).await {
                    // Only fails once tonic stopped taking connections (shutdown).
                    let _ = tx.send(Ok(stream)).await;
                }
                drop(permit);
            });
        }
    }

    /// One handshake; `None` when it failed (refusals are counted and sent to the auditor).
    async fn handshake(&self, tcp: TcpStream, peer: SocketAddr) -> Option<Connection> {
        let (config, slot) = match self.tls.connection() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the TLS configuration of a connection");
                return None;
            }
        };
        let accept = TlsAcceptor::from(config).accept(tcp);
        let error = match tokio::time::timeout(self.handshake_timeout, accept).await {
            Ok(Ok(inner)) => {
                self.metrics.handshakes.connection_opened();
                return Some(Connection {
                    inner,
                    metrics: self.metrics.clone(),
                });
            }
            Ok(Err(e)) => e,
            Err(_) => {
                self.metrics.handshakes.failed();
                tracing::debug!(%peer, "TLS handshake timed out");
                return None;
            }
        };
        match slot.refusal(&error) {
            Some(refusal) => {
                self.metrics.handshakes.refused(refusal.reason);
                tracing::warn!(%peer, %refusal, "TLS handshake refused");
                if self.refusals.try_send(Refused { peer, refusal }).is_err() {
                    self.metrics.handshakes.audit_dropped();
                }
            }
            None => {
                self.metrics.handshakes.failed();
                tracing::debug!(%peer, %error, "TLS handshake failed");
            }
        }
        None
    }
}

/// Resolves once `stop` is true (or its sender is gone).
pub(super) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.metrics.handshakes.connection_closed();
    }
}

impl Connected for Connection {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
