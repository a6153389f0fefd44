//! [`FaultProxy`]: a TCP proxy on 127.0.0.1:0 in front of a coordinator, for network fault
//! tests. It forwards bytes both ways (TLS passes through untouched) and injects, on command:
//! latency on every forwarded read, a reset (RST) of every open connection, a stall (nothing
//! forwarded either way) for a while, a cut after N more client-to-server bytes (a truncated
//! stream), and refusal of new connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

const BUF: usize = 16 * 1024;

/// A running proxy; dropping it stops accepting and resets every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    latency_ms: AtomicU64,
    refuse: AtomicBool,
    stall_until: Mutex<Option<Instant>>,
    /// Client-to-server bytes still forwarded before every connection is cut.
    cut_budget: Mutex<Option<u64>>,
    /// Bumped to reset every open connection.
    resets: watch::Sender<u64>,
    /// Connections accepted, and those refused.
    accepted: AtomicU64,
    refused: AtomicU64,
    /// Bytes forwarded client to server, and server to client.
    up_bytes: AtomicU64,
    down_bytes: AtomicU64,
}

/// What the proxy has seen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyCounts {
    pub accepted: u64,
    pub refused: u64,
    pub up_bytes: u64,
    pub down_bytes: u64,
}

impl FaultProxy {
    /// Forwards connections on a fresh 127.0.0.1 port to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn(accept(listener, target, shared.clone()));
        Self { addr, shared, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:<port>` of the proxy.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// Delays every forwarded read, each way, by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        self.shared.latency_ms.store(ms, Ordering::SeqCst);
    }

    /// Resets (RST) every open connection now.
    pub fn reset_all(&self) {
        self.shared.resets.send_modify(|n| *n += 1);
    }

    /// Forwards nothing, either way, for `duration` from now; connections stay open.
    pub fn stall_for(&self, duration: Duration) {
        *self.shared.stall_until.lock().unwrap() = Some(Instant::now() + duration);
    }

    /// Forwards `bytes` more client-to-server bytes, then cuts the connection that would send
    /// the next one (its server side sees the stream end mid-record).
    pub fn cut_after(&self, bytes: u64) {
        *self.shared.cut_budget.lock().unwrap() = Some(bytes);
    }

    /// Closes new connections at once (open ones are untouched).
    pub fn refuse_new(&self, refuse: bool) {
        self.shared.refuse.store(refuse, Ordering::SeqCst);
    }

    pub fn counts(&self) -> ProxyCounts {
        let s = &self.shared;
        ProxyCounts {
            accepted: s.accepted.load(Ordering::SeqCst),
            refused: s.refused.load(Ordering::SeqCst),
            up_bytes: s.up_bytes.load(Ordering::SeqCst),
            down_bytes: s.down_bytes.load(Ordering::SeqCst),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.reset_all();
    }
}

async fn accept(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if shared.refuse.load(Ordering::SeqCst) {
            shared.refused.fetch_add(1, Ordering::SeqCst);
            let _ = client.set_zero_linger();
            drop(client);
            continue;
        }
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Ok(server) = TcpStream::connect(target).await {
                pump(client, server, shared).await;
            }
        });
    }
}

/// Which way bytes go.
#[derive(Clone, Copy, PartialEq)]
enum Way {
    Up,
    Down,
}

/// Forwards both ways until either side closes or a fault ends the connection.
async fn pump(client: TcpStream, server: TcpStream, shared: Arc<Shared>) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut resets = shared.resets.subscribe();
    resets.mark_unchanged();
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let (mut up, mut down) = (vec![0u8; BUF], vec![0u8; BUF]);
    let (mut up_open, mut down_open) = (true, true);
    while up_open || down_open {
        shared.wait_unstalled().await;
        let (way, n) = tokio::select! {
            _ = resets.changed() => return abort(&cw, &sw),
            r = cr.read(&mut up), if up_open => (Way::Up, r.unwrap_or(0)),
            r = sr.read(&mut down), if down_open => (Way::Down, r.unwrap_or(0)),
        };
        let (data, to, open) = match way {
            Way::Up => (&up[..n], &mut sw, &mut up_open),
            Way::Down => (&down[..n], &mut cw, &mut down_open),
        };
        if n == 0 {
            *open = false;
            let _ = to.shutdown().await;
            continue;
        }
        // Held here while stalled: read, but not forwarded.
        shared.wait_unstalled().await;
        let latency = shared.latency_ms.load(Ordering::SeqCst);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        let (send, cut) = match way {
            Way::Up => shared.take_budget(data.len()),
            Way::Down => (data.len(), false),
        };
        let counter = match way {
            Way::Up => &shared.up_bytes,
            Way::Down => &shared.down_bytes,
        };
        if to.write_all(&data[..send]).await.is_err() {
            return abort(&cw, &sw);
        }
        counter.fetch_add(send as u64, Ordering::SeqCst);
        if cut {
            let _ = to.flush().await;
            // The server sees a clean end of stream mid-record; the client a reset.
            let _ = sw.shutdown().await;
            let _ = cw.as_ref().set_zero_linger();
            return;
        }
    }
}

fn abort(cw: &tokio::net::tcp::OwnedWriteHalf, sw: &tokio::net::tcp::OwnedWriteHalf) {
    let _ = cw.as_ref().set_zero_linger();
    let _ = sw.as_ref().set_zero_linger();
}

impl Shared {
    async fn wait_unstalled(&self) {
        loop {
            let until = *self.stall_until.lock().unwrap();
            match until {
                Some(t) if t > Instant::now() => tokio::time::sleep_until(t).await,
                _ => return,
            }
        }
    }

    /// How many of `n` client-to-server bytes to forward, and whether to cut after them.
    fn take_budget(&self, n: usize) -> (usize, bool) {
        let mut budget = self.cut_budget.lock().unwrap();
        match *budget {
            None => (n, false),
            Some(left) if (n as u64) < left => {
                *budget = Some(left - n as u64);
                (n, false)
            }
            Some(left) => {
                *budget = None;
                (usize::try_from(left).unwrap_or(n), true)
            }
        }
    }
}
