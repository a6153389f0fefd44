//! The delta stream's trailing checksum at intake, where the coordinator hashes each byte once
//! (the blob's hash state where the body ends is the decoder's reference): a payload whose
//! trailer or body was altered, sent with a header SHA-256 that matches the altered bytes (as
//! a broken client would send it), is refused as a checksum mismatch whatever the chunking,
//! and the round then completes with the intact update alone.

mod support;

use fedinspect_common::delta::Codec;
use fedinspect_coordinator::config::Limits;
use fedinspect_proto::v1 as pb;
use support::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_altered_trailer_or_body_is_refused_as_a_checksum_mismatch() {
    let site = Site::new(1);
    let config = site.config("data", policy(1, 1, 30, Codec::F32), Limits::default());
    let running = start(&config).await;
    let url = url(&running);
    let mut plant = Plant::connect(&site, &url, "plant-1").await;
    plant.join(100).await;
    let task = plant.next_train().await;
    let good = encode(&synthetic_delta(1, 0.01), Codec::F32);
    let body = good.len() - 32;

    // The last trailer byte, the first trailer byte (the body/trailer boundary of the blob's
    // hash) and the last value's low mantissa bit (still a finite value).
    for (id, at) in [(20u8, good.len() - 1), (21, body), (22, body - 4)] {
        let mut bad = good.clone();
        bad[at] ^= 1;
        let status = plant
            .upload(
                header(&task, &bad, pb::Codec::F32, 100, id),
                &bad,
                bad.len(),
            )
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "byte {at}: {status:?}"
        );
        assert!(
            status.message().contains("checksum does not match"),
            "byte {at}: {}",
            status.message()
        );
    }

    let accepted = plant
        .upload(
            header(&task, &good, pb::Codec::F32, 100, 1),
            &good,
            good.len(),
        )
        .await
        .unwrap();
    assert!(!accepted.duplicate);
    wait_for_version(&site, &url, 2).await;
    let published = plant.download(2).await;
    let expected = expected_fedavg(&base_model(), &[("plant-1", 100, &good, Codec::F32)]);
    let (model, _) = fedinspect_common::ModelState::from_safetensors_bytes(&published).unwrap();
    assert_eq!(model, expected);
    running
        .stop(std::time::Duration::from_secs(10))
        .await
        .unwrap();
}
