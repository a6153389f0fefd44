//! Peak memory of the federation's processes, read from Linux's `/proc/<pid>/status`
//! (`VmHWM`, the resident-set high-water mark) just before they are stopped: what one plant
//! costs on this machine, the figure that bounds how many virtual plants fit on it. With
//! in-process plants, what they cost together (peak of `simulate` minus its resident memory
//! before they started), and after every round the resident memory (`VmRSS`) of `simulate`
//! and of the coordinator, which shows whether memory grows with rounds.

use std::collections::BTreeMap;

use serde::Serialize;

/// Peak resident memory in bytes of the coordinator and of each plant process; `None` (or a
/// missing plant) where the system does not say (not Linux, or the process already ended).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProcessMemory {
    pub coordinator: Option<u64>,
    pub plants: BTreeMap<String, u64>,
    /// The in-process plants together, when the plants ran inside `simulate`.
    pub in_process: Option<InProcessMemory>,
    /// Resident memory after each round.
    pub by_round: Vec<RoundMemory>,
}

/// What the in-process plants cost `simulate`, in bytes.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct InProcessMemory {
    pub plants: usize,
    /// `VmRSS` of `simulate` with the coordinator up, just before the plants were built.
    pub baseline_rss: u64,
    /// `VmHWM` of `simulate` after the last round (before evaluation).
    pub peak_rss: u64,
    /// (peak − baseline) / plants.
    pub per_plant: u64,
}

/// Resident memory (`VmRSS`, bytes) once round `round` ended.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RoundMemory {
    pub round: u64,
    /// This program: with in-process plants, the plants' memory.
    pub simulate: Option<u64>,
    pub coordinator: Option<u64>,
}

impl ProcessMemory {
    /// The mean over the plants that reported, in bytes.
    pub fn mean_plant(&self) -> Option<u64> {
        let n = self.plants.len() as u64;
        (n > 0).then(|| self.plants.values().sum::<u64>() / n)
    }
}

/// `VmHWM` of process `pid` in bytes.
pub fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_hwm(&status)
}

/// `VmRSS` (resident now) of process `pid` in bytes.
pub fn current_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_kib(&status, "VmRSS:")
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    parse_kib(status, "VmHWM:")
}

fn parse_kib(status: &str, field: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line
        .trim_start_matches(field)
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_high_water_mark_in_bytes() {
        let status = "Name:\tclient\nVmPeak:\t  900 kB\nVmHWM:\t  2048 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(2048 * 1024));
        assert_eq!(parse_vm_hwm("Name:\tx\n"), None);
        assert_eq!(parse_kib(status, "VmRSS:"), Some(1000 * 1024));
    }

    #[test]
    fn this_process_has_a_peak() {
        if !cfg!(target_os = "linux") {
            println!("not checking: /proc/<pid>/status is Linux's");
            return;
        }
        assert!(peak_rss(std::process::id()).is_some_and(|b| b > 1 << 20));
    }
}
