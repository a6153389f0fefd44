//! The loopback TLS transfer bound: the time one mutual-TLS 1.3 stream (rustls with the ring
//! provider, the coordinator's and a plant's certificates, as the coordinator uses) takes to
//! push a given number of bytes over 127.0.0.1, sender and receiver on their own tasks of a
//! two-thread runtime, in 1 MiB writes. No framing, no hashing, no disk: what the bytes of a
//! round cost at least.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use fedinspect_common::tls::{self, Role, TlsFiles};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::{TlsAcceptor, TlsConnector};

const WRITE: usize = 1 << 20;

/// The best of `tries` transfers of `bytes` bytes (the handshake is not timed).
pub async fn measure(
    server: &TlsFiles,
    client: &TlsFiles,
    bytes: u64,
    tries: u32,
) -> Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..tries {
        best = best.min(once(server, client, bytes).await?);
    }
    Ok(best)
}

async fn once(server: &TlsFiles, client: &TlsFiles, bytes: u64) -> Result<Duration> {
    let acceptor = TlsAcceptor::from(tls::server_config(server)?);
    let connector = TlsConnector::from(tls::client_config(client, Role::Plant)?);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let receiver = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut s = acceptor.accept(tcp).await?;
        let mut buf = vec![0u8; WRITE];
        s.write_all(b"go").await?; // handshake done on both sides
        s.flush().await?;
        let mut got = 0u64;
        while got < bytes {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                bail!("the sender closed after {got} of {bytes} bytes");
            }
            got += n as u64;
        }
        Ok::<Instant, anyhow::Error>(Instant::now())
    });
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let mut s = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let mut go = [0u8; 2];
    s.read_exact(&mut go).await?;
    let data = vec![0x5au8; WRITE];
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = WRITE.min(usize::try_from(bytes - sent).unwrap_or(WRITE));
        s.write_all(&data[..n]).await?;
        sent += n as u64;
    }
    s.flush().await?;
    let done = receiver.await??;
    Ok(done - started)
}
