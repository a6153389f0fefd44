//! [`Evaluator`]: evaluates the published versions of a run on a thread of its own, in the
//! order they are sent, so that following the next round (and printing its progress) goes on
//! meanwhile. It uses one LibTorch thread while the plants train beside it, and `threads` once
//! told that training is over.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use anyhow::{anyhow, Result};
use fedinspect_common::arch::ArchConfig;
use fedinspect_common::ModelState;
use fedinspect_coordinator::rpc::admin_client::RoundDetailView;
use tch::Device;

use crate::evaluation::TestSet;
use crate::interrupt::Interrupt;
use crate::report::{human_bytes, RoundRow};

/// A closed round and, if it published one, its version.
type Job = (RoundDetailView, Option<ModelState>);

pub struct Evaluator {
    jobs: Option<mpsc::Sender<Job>>,
    training_over: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Vec<RoundRow>>>>,
}

impl Evaluator {
    pub fn start(
        test: TestSet,
        arch: ArchConfig,
        device: Device,
        threads: i32,
        interrupt: Interrupt,
    ) -> Result<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let training_over = Arc::new(AtomicBool::new(false));
        let over = training_over.clone();
        let thread = std::thread::Builder::new()
            .name("evaluator".into())
            .spawn(move || {
                let mut rows = Vec::new();
                for (detail, model) in rx {
                    // LibTorch's thread count is per calling thread: set it here.
                    let n = if over.load(Ordering::SeqCst) {
                        threads
                    } else {
                        1
                    };
                    tch::set_num_threads(n.max(1));
                    rows.push(row(&test, &arch, device, &interrupt, &detail, model)?);
                }
                Ok(rows)
            })?;
        Ok(Self {
            jobs: Some(jobs),
            training_over,
            thread: Some(thread),
        })
    }

    /// Queues a closed round.
    pub fn send(&mut self, detail: RoundDetailView, model: Option<ModelState>) -> Result<()> {
        self.check()?;
        let jobs = self.jobs.as_ref().expect("jobs are sent before finish");
        jobs.send((detail, model))
            .map_err(|_| anyhow!("the evaluator stopped"))
    }

    /// Fails with the evaluator's error if it stopped early.
    pub fn check(&mut self) -> Result<()> {
        if self.thread.as_ref().is_some_and(JoinHandle::is_finished) {
            self.join()?;
            return Err(anyhow!("the evaluator stopped before the run ended"));
        }
        Ok(())
    }

    /// Says training is over (later evaluations use every thread asked for), waits for the
    /// queued evaluations, and returns the rows in round order.
    pub fn finish(mut self) -> Result<Vec<RoundRow>> {
        self.training_over.store(true, Ordering::SeqCst);
        self.jobs = None;
        self.join()
    }

    fn join(&mut self) -> Result<Vec<RoundRow>> {
        let thread = self.thread.take().expect("the evaluator is joined once");
        thread
            .join()
            .map_err(|_| anyhow!("the evaluator panicked"))?
    }
}

/// The row of a closed round with its version evaluated; printed as it is made.
fn row(
    test: &TestSet,
    arch: &ArchConfig,
    device: Device,
    interrupt: &Interrupt,
    detail: &RoundDetailView,
    model: Option<ModelState>,
) -> Result<RoundRow> {
    let Some(model) = model else {
        return Ok(RoundRow::new(detail, None, None));
    };
    let scores = test.evaluate(arch, &model, device, interrupt)?;
    let row = RoundRow::new(detail, Some(model.content_hash().to_hex()), Some(scores));
    println!(
        "round {}: version {} map_33 {:.3} map_50 {:.3} ({} participants, {} up, {} down, {:.1} s; evaluated in {:.1} s)",
        row.round,
        detail.round.published_version,
        scores.map_33,
        scores.map_50,
        row.participants,
        human_bytes(row.bytes_up),
        human_bytes(row.bytes_down),
        row.seconds,
        scores.seconds
    );
    Ok(row)
}
