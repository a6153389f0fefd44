//! The protocol target's entry function: outside bytes decoded as the gRPC messages of
//! `proto/` that the coordinator receives (and those a plant receives), then converted at the
//! coordinator's edge (`rpc::from_proto`, reached through its public `TryFrom`/`From` impls)
//! and fed to the common-side checks they reach: the plant's update signature and the JSON
//! the storage writes. Standalone on purpose: a test outside this crate can include it with
//! `#[path]` (needs `prost`, `serde_json`, `fedinspect_proto`, `fedinspect_coordinator`).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use fedinspect_common::fuzzing::Outcome;
use fedinspect_common::manifests::{UpdateManifest, UPDATE_KIND};
use fedinspect_common::signing::{SigningKey, VerifyingKey, PUBLIC_KEY_LEN};
use fedinspect_coordinator::intake::{check_protocol, UpdateHeader};
use fedinspect_coordinator::records::Capabilities;
use fedinspect_proto::v1 as pb;
use prost::Message;

/// Flag bit of byte 0: replace an update header's signature with the harness key's, so that
/// headers get past the signature check.
pub const RESIGN: u8 = 0x80;
/// Byte 0 without [`RESIGN`], modulo this, picks the message type ([`KINDS`] order).
pub const KIND_MASK: u8 = 0x1f;

/// The message types, in the order byte 0 selects them.
pub const KINDS: [&str; 20] = [
    "RegisterRequest",
    "UploadUpdateRequest",
    "UploadStatusRequest",
    "DownloadModelRequest",
    "TasksRequest",
    "DownloadBundleRequest",
    "ReportInstallRequest",
    "PromoteRequest",
    "RollbackRequest",
    "RevokeRequest",
    "GetRoundRequest",
    "ListRoundsRequest",
    "ListModelsRequest",
    "ExportModelRequest",
    // What a plant receives from the coordinator (decoding only: the client's conversion links
    // LibTorch).
    "Task",
    "Chunk",
    "RegisterResponse",
    "UploadUpdateResponse",
    "UploadStatusResponse",
    "StatusResponse",
];

/// The plant id the harness uploads as.
const PLANT: &str = "fuzz-plant";

/// Byte 0 picks the message type (low five bits, modulo [`KINDS`]) and [`RESIGN`]; the rest
/// is the message. Checks: a decoded message re-encodes to one of the same length that
/// decodes and converts to the same result; converted headers hold only finite metrics, and
/// their manifest verifies with the key that signed it; capabilities survive storage's JSON.
pub fn proto_messages(data: &[u8]) -> Outcome {
    let Some((&flags, bytes)) = data.split_first() else {
        return Outcome::unusable("empty input (byte 0 picks the message type)");
    };
    let kind = usize::from(flags & KIND_MASK) % KINDS.len();
    let resign = flags & RESIGN != 0;
    match kind {
        0 => decoded::<pb::RegisterRequest, _>(bytes, register),
        1 => decoded::<pb::UploadUpdateRequest, _>(bytes, |m| upload(m, resign)),
        2 => decoded::<pb::UploadStatusRequest, _>(bytes, |m| protocol(m.protocol_version)),
        3 => decoded::<pb::DownloadModelRequest, _>(bytes, |m| protocol(m.protocol_version)),
        4 => decoded::<pb::TasksRequest, _>(bytes, |m| protocol(m.protocol_version)),
        5 => decoded::<pb::DownloadBundleRequest, _>(bytes, none),
        6 => decoded::<pb::ReportInstallRequest, _>(bytes, none),
        7 => decoded::<pb::PromoteRequest, _>(bytes, none),
        8 => decoded::<pb::RollbackRequest, _>(bytes, none),
        9 => decoded::<pb::RevokeRequest, _>(bytes, none),
        10 => decoded::<pb::GetRoundRequest, _>(bytes, none),
        11 => decoded::<pb::ListRoundsRequest, _>(bytes, none),
        12 => decoded::<pb::ListModelsRequest, _>(bytes, none),
        13 => decoded::<pb::ExportModelRequest, _>(bytes, none),
        14 => decoded::<pb::Task, _>(bytes, none),
        15 => decoded::<pb::Chunk, _>(bytes, none),
        16 => decoded::<pb::RegisterResponse, _>(bytes, none),
        17 => decoded::<pb::UploadUpdateResponse, _>(bytes, none),
        18 => decoded::<pb::UploadStatusResponse, _>(bytes, none),
        _ => decoded::<pb::StatusResponse, _>(bytes, none),
    }
}

/// Decodes `bytes` as `M`, checks the re-encoding, and runs `convert` on both decodings, which
/// must give the same result.
fn decoded<M, R>(bytes: &[u8], convert: impl Fn(M) -> Result<R, Outcome>) -> Outcome
where
    M: Message + Default,
    R: PartialEq + std::fmt::Debug,
{
    let message = match M::decode(bytes) {
        Ok(m) => m,
        Err(e) => return Outcome::refused(e),
    };
    let encoded = message.encode_to_vec();
    assert_eq!(encoded.len(), message.encoded_len(), "encoded_len is wrong");
    let again = M::decode(encoded.as_slice())
        .unwrap_or_else(|e| panic!("a message we encoded does not decode: {e}"));
    assert_eq!(
        again.encoded_len(),
        encoded.len(),
        "a message changed size on a round trip"
    );
    let first = convert(message);
    let second = convert(again);
    assert_eq!(first, second, "a re-encoded message converts differently");
    match first {
        Ok(_) => Outcome::Accepted,
        Err(refused) => refused,
    }
}

fn none<M>(_: M) -> Result<(), Outcome> {
    Ok(())
}

fn protocol(version: u32) -> Result<(), Outcome> {
    check_protocol(version).map_err(Outcome::refused)
}

/// What `register` stores: the key (empty or 32 bytes) and the capabilities, as JSON.
fn register(m: pb::RegisterRequest) -> Result<Capabilities, Outcome> {
    let pb::RegisterRequest {
        protocol_version,
        capabilities,
        plant_public_key,
    } = m;
    protocol(protocol_version)?;
    if !(plant_public_key.is_empty() || plant_public_key.len() == PUBLIC_KEY_LEN) {
        let found = plant_public_key.len();
        return Err(Outcome::unusable(&format!("a {found}-byte plant key")));
    }
    let caps: Capabilities = capabilities.map(Into::into).unwrap_or_default();
    let json = serde_json::to_vec(&caps).expect("capabilities serialise");
    let back: Capabilities = serde_json::from_slice(&json)
        .unwrap_or_else(|e| panic!("stored capabilities do not read back: {e}"));
    assert_eq!(back, caps, "capabilities changed in storage's JSON");
    Ok(caps)
}

/// An upload's header: the coordinator's conversion, then the signature check the coordinator
/// runs for a plant that registered a key (`intake::check_plant_signature`, rebuilt here from
/// public parts because it is private). A chunk's bytes go to the delta decoder, which has its
/// own target.
fn upload(m: pb::UploadUpdateRequest, resign: bool) -> Result<Option<UpdateHeader>, Outcome> {
    let header = match m.part {
        Some(pb::upload_update_request::Part::Header(h)) => h,
        Some(pb::upload_update_request::Part::Chunk(_)) => return Ok(None),
        None => return Err(Outcome::unusable("an upload message without its part")),
    };
    let mut header = UpdateHeader::try_from(header).map_err(Outcome::refused)?;
    if let Some((k, v)) = header.metrics.iter().find(|(_, v)| !v.is_finite()) {
        panic!("metric '{k}' = {v} passed the conversion");
    }
    let json = serde_json::to_vec(&header.metrics).expect("metrics serialise");
    if let Err(e) = serde_json::from_slice::<BTreeMap<String, f64>>(&json) {
        panic!("converted metrics do not survive storage's JSON: {e}");
    }
    let manifest = UpdateManifest {
        kind: UPDATE_KIND.to_string(),
        plant_id: PLANT.to_string(),
        update_id: header.update_id.to_hex(),
        round: header.round,
        base_version: header.base_version,
        base_hash: header.base_hash.to_hex(),
        codec: header.codec.name().to_string(),
        num_samples: header.num_samples,
        payload_sha256: header.payload_sha256.to_hex(),
    };
    if resign {
        header.plant_signature = manifest
            .sign(signing_key())
            .unwrap_or_else(|e| panic!("the harness cannot sign a manifest: {e}"));
    }
    let verified = manifest.verify(&verifying_key(), &header.plant_signature);
    match verified {
        Ok(()) => Ok(Some(header)),
        Err(e) if resign => panic!("a manifest signed by the harness does not verify: {e}"),
        Err(e) => Err(Outcome::refused(e)),
    }
}

fn signing_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate().expect("the system RNG works"))
}

fn verifying_key() -> VerifyingKey {
    signing_key().verifying_key()
}

/// Seed inputs: `(file name, bytes, accepted)`, byte 0 included.
pub fn seeds() -> Vec<(&'static str, Vec<u8>, bool)> {
    let kind = |name: &str| {
        let i = KINDS
            .iter()
            .position(|k| *k == name)
            .expect("a listed kind");
        u8::try_from(i).expect("few kinds")
    };
    let with = |flags: u8, m: &dyn EncodeDyn| [vec![flags], m.bytes()].concat();
    let version = fedinspect_proto::PROTOCOL_VERSION;
    let register = pb::RegisterRequest {
        protocol_version: version,
        capabilities: Some(pb::Capabilities {
            device: "cuda:0".into(),
            gpu_name: "NVIDIA H100".into(),
            compute_capability: "9.0".into(),
            tensorrt_version: "10.3.0".into(),
            samples_per_class: [("open".to_string(), 12), ("short".to_string(), 7)].into(),
            num_samples: 19,
            client_version: "0.1.0".into(),
        }),
        plant_public_key: verifying_key().as_bytes().to_vec(),
    };
    let header = pb::UpdateHeader {
        protocol_version: version,
        update_id: vec![7; 16],
        round: 3,
        base_version: 2,
        base_hash: vec![1; 32],
        codec: pb::Codec::Q8.into(),
        num_samples: 19,
        payload_bytes: 4096,
        payload_sha256: vec![2; 32],
        plant_signature: vec![0; 64],
        metrics: [
            ("train_seconds".to_string(), 1.5),
            ("loss".to_string(), 0.25),
        ]
        .into(),
        resume_offset: 0,
    };
    let upload = |part| pb::UploadUpdateRequest { part: Some(part) };
    let chunk = pb::Chunk {
        offset: 0,
        data: vec![0xab; 16],
        total_bytes: 16,
        sha256: vec![3; 32],
    };
    let task = pb::Task {
        kind: Some(pb::task::Kind::Train(pb::TrainTask {
            round: 3,
            base_version: 2,
            base_hash: vec![1; 32],
            base_signature: vec![4; 64],
            plan: Some(pb::TrainPlan {
                local_epochs: 1,
                learning_rate: 1e-3,
                fedprox_mu: 0.01,
                codec: pb::Codec::Q8.into(),
                q8_block: 256,
                batch_size: 8,
                lr_span_start: 0.0,
                lr_span_end: 0.0,
            }),
            deadline_unix_ms: 1_700_000_000_000,
        })),
    };
    let status = pb::UploadStatusRequest {
        protocol_version: version,
        update_id: vec![7; 16],
    };
    vec![
        ("register", with(kind("RegisterRequest"), &register), true),
        (
            "upload_header_resigned",
            with(
                kind("UploadUpdateRequest") | RESIGN,
                &upload(pb::upload_update_request::Part::Header(header.clone())),
            ),
            true,
        ),
        (
            "upload_header_bad_signature",
            with(
                kind("UploadUpdateRequest"),
                &upload(pb::upload_update_request::Part::Header(header)),
            ),
            false,
        ),
        (
            "upload_chunk",
            with(
                kind("UploadUpdateRequest"),
                &upload(pb::upload_update_request::Part::Chunk(chunk.clone())),
            ),
            true,
        ),
        (
            "upload_status",
            with(kind("UploadStatusRequest"), &status),
            true,
        ),
        ("task_train", with(kind("Task"), &task), true),
        ("chunk", with(kind("Chunk"), &chunk), true),
    ]
}

/// `encode_to_vec` for messages of different types in one list.
trait EncodeDyn {
    fn bytes(&self) -> Vec<u8>;
}

impl<M: Message> EncodeDyn for M {
    fn bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }
}
