//! The agent's errors: [`BuildError`] when it cannot start, [`AgentError`] while it runs, with
//! how far each reaches (a task, the connection, or the agent).

use fedinspect_common::arch::ArchError;
use fedinspect_common::signing::SigningError;

use super::local::LocalError;
use super::rpc::RpcError;
use super::state::StateError;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Data(#[from] LocalError),
    #[error("training.device is cuda but LibTorch sees no CUDA device; use auto or cpu, or check the GPU driver")]
    NoCuda,
    #[error("the configured model is not a valid detector: {0}")]
    Arch(#[from] ArchError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("cannot open the installed bundles: {0}")]
    Bundles(#[from] crate::bundle::InstallError),
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Rpc(#[from] RpcError),
    #[error("the coordinator refused to register this plant: {0}")]
    Registration(RpcError),
    #[error("the coordinator signs with key {found} but this plant pinned {pinned}; if the coordinator's key really changed, ask its operator for coordinator-signing.pub and update coordinator.public_key")]
    KeyMismatch { pinned: String, found: String },
    #[error("the coordinator registered this plant as '{registered}' but its certificate names '{certificate}'; check tls.cert")]
    PlantIdMismatch {
        registered: String,
        certificate: String,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the base model version {version} is refused: {reason}")]
    Base { version: u64, reason: String },
    #[error("round {round} ends in {left_ms} ms, too soon to train and upload; waiting for the next round")]
    TooLate { round: u64, left_ms: i64 },
    #[error(transparent)]
    Local(#[from] LocalError),
    #[error("cannot sign the update: {0}")]
    Signing(#[from] SigningError),
    #[error("the training thread failed: {0}")]
    Join(String),
    #[error("injected fault: the acknowledgement of update {0} was dropped")]
    InjectedAckLoss(String),
}

/// How far an error reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Scope {
    /// This task is given up; the next one may succeed.
    Task,
    /// The connection is dropped and made again after a backoff.
    Session,
    /// The agent stops: retrying cannot help.
    Fatal,
}

impl AgentError {
    pub(super) fn scope(&self) -> Scope {
        match self {
            AgentError::Registration(_)
            | AgentError::KeyMismatch { .. }
            | AgentError::PlantIdMismatch { .. }
            | AgentError::State(_) => Scope::Fatal,
            AgentError::Rpc(_) | AgentError::InjectedAckLoss(_) => Scope::Session,
            AgentError::Base { .. }
            | AgentError::TooLate { .. }
            | AgentError::Local(_)
            | AgentError::Signing(_)
            | AgentError::Join(_) => Scope::Task,
        }
    }
}
