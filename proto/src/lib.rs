//! Generated gRPC types and services for the plant-facing federation service and the
//! operator-facing admin service. Only the rpc edge modules of the coordinator and client use
//! these types; the core works on `fedinspect_common` types.

/// Version of the wire protocol. Every request carries it; a peer with another major version
/// is refused with `FAILED_PRECONDITION` naming both versions.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest gRPC message either side sends or accepts. Payloads above this stream in chunks.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Size of one payload chunk in a model download or update upload stream.
pub const CHUNK_BYTES: usize = 1024 * 1024;

pub mod v1 {
    tonic::include_proto!("fedinspect.v1");
}
