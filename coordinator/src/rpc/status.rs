//! The one place core errors become gRPC statuses: each [`CoreError`] variant gets the code a
//! client can act on, and its message says what to do.

use tonic::{Code, Status};

use crate::error::CoreError;

pub fn to_status(e: &CoreError) -> Status {
    Status::new(code(e), e.to_string())
}

fn code(e: &CoreError) -> Code {
    use CoreError::*;
    match e {
        Malformed(_)
        | ZeroSamples
        | TooManySamples { .. }
        | PayloadLength { .. }
        | ChunkOutOfOrder { .. }
        | ChunkTooLarge(_)
        | PayloadOverrun { .. }
        | BadDelta(_)
        | PlantSignature { .. }
        | NormExceeded { .. }
        | ResumeHeaderChanged { .. } => Code::InvalidArgument,
        ProtocolVersion { .. }
        | NotRegistered(_)
        | NoRoundOpen
        | WrongRound { .. }
        | StaleBase { .. }
        | BaseHashMismatch { .. }
        | WrongCodec { .. }
        | ResumeOffset { .. }
        | RoundClosed { .. }
        | NotSampled { .. }
        | NoModel
        | AlreadyInitialised(_)
        | AdminRefused(_) => Code::FailedPrecondition,
        WrongRole { .. } | Revoked { .. } | PlantKeyChanged { .. } => Code::PermissionDenied,
        Unauthenticated(_) => Code::Unauthenticated,
        UploadInProgress { .. } => Code::Aborted,
        AlreadyContributed { .. } | UpdateIdTaken { .. } => Code::AlreadyExists,
        PayloadTooLarge { .. } | DiskFull(_) => Code::ResourceExhausted,
        DataReadOnly(_) => Code::Unavailable,
        Truncated { .. } | PayloadDigest { .. } => Code::DataLoss,
        UnknownVersion(_) | UnknownPlant(_) | UnknownRound(_) => Code::NotFound,
        Model(_) | Aggregation(_) | Signing(_) | Storage(_) | Internal(_) => Code::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedinspect_common::delta::DeltaError;

    #[test]
    fn decoder_errors_split_into_data_loss_and_invalid_argument() {
        let cut = CoreError::from_delta(DeltaError::Truncated {
            got: 1,
            expected: 2,
        });
        assert_eq!(to_status(&cut).code(), Code::DataLoss);
        let nan = CoreError::from_delta(DeltaError::NonFinite {
            name: "w".into(),
            index: 0,
        });
        assert_eq!(to_status(&nan).code(), Code::InvalidArgument);
        assert!(
            to_status(&nan).message().contains("non-finite"),
            "{}",
            to_status(&nan).message()
        );
    }
}
