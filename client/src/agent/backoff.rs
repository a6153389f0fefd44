//! Reconnection delays: exponential from an initial delay up to a cap, with jitter so that
//! plants cut off together do not reconnect together.

use std::time::Duration;

use rand::Rng;

pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            next: initial,
        }
    }

    /// The delay before the next attempt: uniform in [d/2, d] where d doubles per failure
    /// up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.max);
        let half = d / 2;
        half + half.mul_f64(rand::thread_rng().gen_range(0.0..=1.0))
    }

    /// After a successful registration the next failure starts from the initial delay.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(750));
        let bounds = [100, 200, 400, 750, 750];
        for d in bounds {
            let got = b.next_delay();
            let d = Duration::from_millis(d);
            assert!(
                got >= d / 2 && got <= d,
                "{got:?} outside [{:?}, {d:?}]",
                d / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
