//! Who is calling: the identity in the verified client certificate of the request's TLS
//! session (never a message field), and the role check of each service.

use fedinspect_common::tls::{identity_of_peer, PeerIdentity, Role};
use tonic::Request;

use crate::error::CoreError;

/// The caller's identity, which must have `role`.
pub fn caller<T>(request: &Request<T>, role: Role) -> Result<PeerIdentity, CoreError> {
    let certs = request.peer_certs();
    let identity = identity_of_peer(certs.as_deref().map(Vec::as_slice))
        .map_err(|e| CoreError::Unauthenticated(e.to_string()))?;
    if identity.role != role {
        return Err(CoreError::WrongRole {
            role: identity.role.as_str(),
            expected: role.as_str(),
        });
    }
    Ok(identity)
}

/// How a caller appears in the audit log, whether or not it could be identified.
pub fn actor<T>(request: &Request<T>) -> String {
    let certs = request.peer_certs();
    match identity_of_peer(certs.as_deref().map(Vec::as_slice)) {
        Ok(id) => format!("{}:{}", id.role, id.id),
        Err(_) => "unidentified".to_string(),
    }
}
