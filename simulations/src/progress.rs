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

/// How long the rest of a phase will take at the pace so far: `done` of `total` steps took
/// `elapsed_secs`. `None` before the first step and after the last.
pub fn time_left(elapsed_secs: f64, done: u64, total: u64) -> Option<String> {
    if done == 0 || done >= total || !elapsed_secs.is_finite() {
        return None;
    }
    let left = elapsed_secs / done as f64 * (total - done) as f64;
    Some(if left < 90.0 {
        format!("about {left:.0} s left")
    } else if left < 5400.0 {
        format!("about {:.0} min left", left / 60.0)
    } else {
        format!("about {:.1} h left", left / 3600.0)
    })
}

#[cfg(test)]
mod tests {
    use super::time_left;

    #[test]
    fn time_left_extrapolates_the_pace_so_far() {
        assert_eq!(time_left(50.0, 1, 60).as_deref(), Some("about 49 min left"));
        assert_eq!(time_left(30.0, 3, 10).as_deref(), Some("about 70 s left"));
        assert_eq!(time_left(3600.0, 1, 3).as_deref(), Some("about 2.0 h left"));
        assert_eq!(time_left(10.0, 0, 5), None, "no pace before the first step");
        assert_eq!(time_left(10.0, 5, 5), None, "nothing left after the last");
    }
}
