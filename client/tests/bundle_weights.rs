//! An installed bundle's weights load as a client detector checkpoint (what `client detect
//! --bundle` needs), holding exactly the model the manifest names, and the manifest's default
//! preprocessing matches the client loader's.

mod bundle_support;

use bundle_support::*;
use fedinspect_client::bundle::{BundleInstaller, InstallOptions};
use fedinspect_client::data::planes::PAD_VALUE;
use fedinspect_client::detector::Detector;
use fedinspect_common::bundle::{DEFAULT_LETTERBOX_PAD, WEIGHTS_FILE};
use fedinspect_common::signing::SigningKey;

#[test]
fn the_weights_load_as_the_model_the_manifest_names() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let built = build_onnx_only(dir.path(), &key, 4);
    let plant = BundleInstaller::open(&dir.path().join("state"), key.verifying_key()).unwrap();
    plant
        .install_archive(&built.archive[..], &InstallOptions::default())
        .unwrap();
    let installed = plant.current().unwrap().unwrap();
    let m = &installed.bundle.manifest;
    let (detector, info) =
        Detector::load_checkpoint_weights(&installed.bundle.path(WEIGHTS_FILE), tch::Device::Cpu)
            .unwrap();
    assert_eq!(detector.arch(), &m.architecture);
    assert_eq!(detector.class_names(), m.class_names.as_slice());
    assert_eq!(
        detector.state().unwrap().content_hash().to_hex(),
        m.model_hash
    );
    assert!(info.training.is_none());

    assert_eq!(DEFAULT_LETTERBOX_PAD, PAD_VALUE);
    assert_eq!(m.preprocessing.letterbox.pad_value, PAD_VALUE);
    assert_eq!(m.preprocessing.letterbox.size, m.architecture.input_size);
}
