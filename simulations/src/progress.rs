//! The progress display of a federation run: one line per phase or event, each prefixed with
//! the time since the run started, so a researcher watching a long study sees where it is
//! and how long each round takes.

use std::collections::BTreeSet;
use std::time::Instant;

use fedinspect_coordinator::rpc::admin_client::RoundDetailView;

use crate::report::human_bytes;

/// The run's start; prints lines with the elapsed time.
#[derive(Clone, Copy, Debug)]
pub struct Clock(Instant);

impl Clock {
    pub fn start() -> Self {
        Self(Instant::now())
    }

    pub fn seconds(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }

    /// Prints `message` as `[  12.3 s] message`.
    pub fn say(&self, message: impl AsRef<str>) {
        println!("[{:>7.1} s] {}", self.seconds(), message.as_ref());
    }
}

/// Prints a round's opening and each update as the coordinator accepts it (for
/// [`crate::federation::Federation::wait_for_round`]).
pub fn round_watcher(round: u64, clock: &Clock) -> impl FnMut(&RoundDetailView) {
    let clock = *clock;
    let mut opened = false;
    let mut shown = BTreeSet::new();
    move |d: &RoundDetailView| {
        if !opened {
            clock.say(format!(
                "round {round} open on version {}: plants downloading and training",
                d.round.base_version
            ));
            opened = true;
        }
        // Updates are listed in plant-id order, not in the order they arrived.
        for u in &d.updates {
            if !shown.insert(u.update_id.clone()) {
                continue;
            }
            let local = match (
                u.metrics.get("local_map50_before"),
                u.metrics.get("local_map50_after"),
            ) {
                (Some(b), Some(a)) => format!(", local mAP@0.5 {b:.3} -> {a:.3}"),
                _ => String::new(),
            };
            clock.say(format!(
                "  round {round}: {} delivered {} ({} samples, trained {:.1} s{local})",
                u.plant_id,
                human_bytes(u.payload_bytes),
                u.num_samples,
                u.metrics.get("train_seconds").copied().unwrap_or(0.0),
            ));
        }
    }
}
