//! [`Interrupt`]: whether the operator asked this program to stop (Ctrl-C or SIGTERM). Long
//! waits and evaluations check it, so an interrupted run returns an error through the normal
//! path and the process guards stop every child on the way out.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug, Default)]
pub struct Interrupt(Arc<AtomicBool>);

#[derive(Debug, thiserror::Error)]
#[error("interrupted; the coordinator and plants were stopped")]
pub struct Interrupted;

impl Interrupt {
    /// A flag nothing sets (tests, and callers that handle signals themselves).
    pub fn none() -> Self {
        Self::default()
    }

    /// A flag set by the first SIGINT or SIGTERM from now on, watched by a thread of its own;
    /// a second one ends the program at once.
    pub fn on_signals() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (mut term, mut int) = runtime.block_on(async {
            Ok::<_, std::io::Error>((
                signal(SignalKind::terminate())?,
                signal(SignalKind::interrupt())?,
            ))
        })?;
        let flag = Self::default();
        let set = flag.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                runtime.block_on(async {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    eprintln!("\nstopping: shutting the coordinator and plants down (again to quit at once)");
                    set.0.store(true, Ordering::SeqCst);
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                });
                // The children get SIGTERM from the kernel when this process ends (Linux).
                std::process::exit(130);
            })?;
        Ok(flag)
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err(Interrupted)` once the flag is set.
    pub fn check(&self) -> Result<(), Interrupted> {
        if self.is_set() {
            Err(Interrupted)
        } else {
            Ok(())
        }
    }

    /// `e` as the consequence of the interruption when the flag is set: a coordinator that got
    /// the signal too (`pkill -f` matches its command line, which names the output folder)
    /// stops listening, and the admin call in flight fails with "Unavailable" before the wait
    /// looks at the flag again. The operator asked to stop; that is what the error says, with
    /// `e` as its detail.
    pub fn attribute(&self, e: anyhow::Error) -> anyhow::Error {
        if self.is_set() {
            e.context(Interrupted)
        } else {
            e
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_met_after_the_interruption_is_reported_as_the_interruption() {
        let flag = Interrupt::none();
        let refused =
            || anyhow::anyhow!("coordinator admin status: the coordinator refused (Unavailable)");
        let before = flag.attribute(refused());
        assert!(before.downcast_ref::<Interrupted>().is_none());
        assert_eq!(before.to_string(), refused().to_string());

        flag.0.store(true, Ordering::SeqCst);
        let after = flag.attribute(refused());
        assert!(after.downcast_ref::<Interrupted>().is_some());
        let shown = format!("{after:#}");
        assert!(
            shown.starts_with("interrupted; the coordinator and plants were stopped"),
            "{shown}"
        );
        assert!(
            shown.contains("Unavailable"),
            "the cause stays as detail: {shown}"
        );
    }
}
