//! A TCP relay between a plant and the coordinator that can cut one upload in the middle.
//! It forwards bytes as they are (TLS stays end to end between the two). Armed, it watches
//! for the moment the plant's upload starts (`started()` turns true: the plant saved its
//! pending update, which it does just before sending its first byte), forwards `cut_after`
//! more bytes from the plant, then forwards nothing more from that connection: the
//! coordinator holds a partial upload, as when a plant dies mid-upload. Later connections
//! pass untouched. Shared by the plant-process tests of `client` (`plant_kill.rs`) and
//! `simulations` (`federation_processes.rs`) through `#[path]`.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

type Started = Box<dyn Fn() -> bool + Send + Sync>;

pub struct Relay {
    addr: SocketAddr,
    state: Arc<State>,
}

struct State {
    target: SocketAddr,
    started: Started,
    cut_after: u64,
    armed: AtomicBool,
    /// Plant bytes forwarded since the upload started.
    forwarded: AtomicU64,
    cut: AtomicBool,
}

impl Relay {
    /// Listens on 127.0.0.1 and relays each connection to `target`.
    pub fn start(
        target: SocketAddr,
        cut_after: u64,
        started: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            target,
            started: Box::new(started),
            cut_after,
            armed: AtomicBool::new(true),
            forwarded: AtomicU64::new(0),
            cut: AtomicBool::new(false),
        });
        let s = state.clone();
        std::thread::spawn(move || {
            for plant in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || relay(plant, &s));
            }
        });
        Self { addr, state }
    }

    /// The address to give the plant instead of the coordinator's.
    pub fn address(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// Whether the upload was cut.
    pub fn has_cut(&self) -> bool {
        self.state.cut.load(Ordering::SeqCst)
    }

    /// Plant bytes of the cut upload that reached the coordinator.
    pub fn forwarded_of_upload(&self) -> u64 {
        self.state.forwarded.load(Ordering::SeqCst)
    }
}

fn relay(plant: TcpStream, s: &State) {
    let Ok(coordinator) = TcpStream::connect(s.target) else {
        return;
    };
    let (mut p_in, mut c_out) = (plant.try_clone().unwrap(), coordinator.try_clone().unwrap());
    let (mut c_in, mut p_out) = (coordinator, plant);
    let down = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_in, &mut p_out);
        let _ = c_in.shutdown(Shutdown::Both);
        let _ = p_out.shutdown(Shutdown::Both);
    });
    let mut buf = [0u8; 4096];
    let mut holding = false;
    loop {
        let n = match p_in.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if holding {
            continue; // the plant is cut off: what it sends goes nowhere
        }
        let mut send = n;
        if s.armed.load(Ordering::SeqCst) && (s.started)() {
            let before = s.forwarded.load(Ordering::SeqCst);
            let room = s.cut_after.saturating_sub(before);
            if n as u64 >= room {
                send = usize::try_from(room).unwrap_or(n);
                holding = true;
                s.armed.store(false, Ordering::SeqCst);
            }
            s.forwarded.fetch_add(send as u64, Ordering::SeqCst);
        }
        if c_out.write_all(&buf[..send]).is_err() {
            break;
        }
        if holding {
            s.cut.store(true, Ordering::SeqCst);
        }
    }
    let _ = p_in.shutdown(Shutdown::Both);
    let _ = c_out.shutdown(Shutdown::Both);
    let _ = down.join();
}
