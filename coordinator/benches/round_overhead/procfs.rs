//! What the benchmark reads from `/proc`: resident memory (now and peak) of a process, the
//! loopback byte counters, CPU time of a process and of the whole machine, and a sampler that
//! tracks the peak of the summed RSS of several processes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

/// Clock ticks per second of `/proc/*/stat` and `/proc/stat` (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: f64 = 100.0;

/// A `kB` field of `/proc/<pid>/status`, in bytes.
pub fn status_bytes(pid: u32, field: &str) -> Result<u64> {
    Ok(status_number(pid, field)? * 1024)
}

/// A number field of `/proc/<pid>/status` as written (`Threads:`; kB fields in kB).
pub fn status_number(pid: u32, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .ok_or_else(|| anyhow!("no {field} in /proc/{pid}/status"))?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("bad {field} line: {line}"))?
        .parse()?)
}

/// Resets the peak RSS (`VmHWM`) of this process, so that a cell reports its own peak.
pub fn reset_own_peak() -> Result<()> {
    std::fs::write("/proc/self/clear_refs", "5")
        .context("cannot reset VmHWM via /proc/self/clear_refs")
}

/// `rx_bytes + tx_bytes` of the loopback device.
pub fn loopback_bytes() -> Result<u64> {
    let text = std::fs::read_to_string("/proc/net/dev")?;
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("lo:"))
        .ok_or_else(|| anyhow!("no lo in /proc/net/dev"))?;
    let fields: Vec<u64> = line
        .split_once(':')
        .map(|(_, rest)| rest)
        .unwrap_or_default()
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // rx_bytes is the first field, tx_bytes the ninth.
    Ok(fields.first().copied().unwrap_or(0) + fields.get(8).copied().unwrap_or(0))
}

/// The fields of `/proc/<pid>/stat` after the command name (which may hold spaces), parsed
/// at `indices` (0: the state; 7: minflt; 11, 12: utime, stime).
fn stat_fields<const N: usize>(pid: u32, indices: [usize; N]) -> Result<[u64; N]> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &text[text
        .rfind(')')
        .ok_or_else(|| anyhow!("bad /proc/{pid}/stat"))?
        + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let mut out = [0; N];
    for (o, i) in out.iter_mut().zip(indices) {
        *o = f
            .get(i)
            .ok_or_else(|| anyhow!("short /proc/{pid}/stat"))?
            .parse()?;
    }
    Ok(out)
}

/// utime + stime of process `pid`, in seconds.
pub fn process_cpu_s(pid: u32) -> Result<f64> {
    let [utime, stime] = stat_fields(pid, [11, 12])?;
    Ok((utime + stime) as f64 / TICKS_PER_SEC)
}

/// Minor page faults of process `pid` so far (`minflt`): pages the kernel had to map, and
/// zero, on first touch.
pub fn process_minor_faults(pid: u32) -> Result<u64> {
    let [minflt] = stat_fields(pid, [7])?;
    Ok(minflt)
}

/// Busy CPU seconds of the whole machine (all cores, idle and iowait excluded).
pub fn machine_busy_s() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/stat")?;
    let cpu = text
        .lines()
        .next()
        .ok_or_else(|| anyhow!("empty /proc/stat"))?;
    let v: Vec<f64> = cpu
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let total: f64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    Ok((total - idle) / TICKS_PER_SEC)
}

/// `/proc/loadavg`, as printed.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// Samples the RSS of `pids` every 100 ms and keeps the peak of their sum and of the first.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    peak_sum: Arc<AtomicU64>,
    peak_first: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl RssSampler {
    pub fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_sum = Arc::new(AtomicU64::new(0));
        let peak_first = Arc::new(AtomicU64::new(0));
        let (s, ps, pf) = (stop.clone(), peak_sum.clone(), peak_first.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let rss: Vec<u64> = pids
                    .iter()
                    .map(|&p| status_bytes(p, "VmRSS:").unwrap_or(0))
                    .collect();
                ps.fetch_max(rss.iter().sum(), Ordering::Relaxed);
                pf.fetch_max(rss.first().copied().unwrap_or(0), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Self {
            stop,
            peak_sum,
            peak_first,
            thread: Some(thread),
        }
    }

    /// Stops sampling; returns (peak of the sum, peak of the first process).
    pub fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.peak_sum.load(Ordering::Relaxed),
            self.peak_first.load(Ordering::Relaxed),
        )
    }
}
