//! The `client bundle` commands and `client detect --bundle`, run as the binary on bundles of a
//! tiny detector signed with a fresh key: install a folder, then an archive (the first kept
//! as previous), show, refuse a tampered archive (the running bundle stays), run the
//! installed bundle's model on a DeepPCB pair, refuse to run a tampered bundle folder, lay the
//! bundle out for Triton, and roll back.

mod bundle_support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fedinspect_client::eval::export::DetectionsFile;
use fedinspect_common::signing::SigningKey;
use serde_json::Value;

fn client(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_client"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the client binary runs")
}

fn ok(args: &[&str]) -> String {
    let out = client(args);
    assert!(
        out.status.success(),
        "client {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Offset of `name`'s data inside a bundle archive.
fn data_offset(archive: &[u8], name: &str) -> usize {
    let mut tar = tar::Archive::new(archive);
    for entry in tar.entries().unwrap() {
        let entry = entry.unwrap();
        if entry.path().unwrap().to_str() == Some(name) {
            return entry.raw_file_position() as usize;
        }
    }
    panic!("{name} not in the archive");
}

struct Plant {
    state: PathBuf,
    key: PathBuf,
}

impl Plant {
    fn bundle(&self, rest: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "bundle".into(),
            "--state".into(),
            self.state.display().to_string(),
            "--coordinator-key".into(),
            self.key.display().to_string(),
        ];
        args.extend(rest.iter().map(|s| s.to_string()));
        args
    }

    fn show(&self) -> Value {
        let args = self.bundle(&["--json", "show"]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        serde_json::from_str(&ok(&refs)).unwrap()
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn bundle_commands_install_show_refuse_detect_triton_and_roll_back() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let key = SigningKey::generate().unwrap();
    let key_file = root.join("coordinator-signing.pub");
    key.verifying_key().save(&key_file).unwrap();
    let builds = root.join("builds");
    let v1 = bundle_support::build_onnx_only(&builds, &key, 1);
    let v2 = bundle_support::build_onnx_only(&builds, &key, 2);
    let v2_archive = root.join("v2.tar");
    std::fs::write(&v2_archive, &v2.archive).unwrap();
    let plant = Plant {
        state: root.join("state"),
        key: key_file.clone(),
    };

    // Nothing given: the command says where the bundles must be named.
    let out = client(&["bundle", "show"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--config plant.toml"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A folder, then an archive; the first stays as previous.
    let text = ok(&strs(&plant.bundle(&["install", v1.dir.to_str().unwrap()])));
    assert!(text.contains("installed bundle v1-"), "{text}");
    let text = ok(&strs(
        &plant.bundle(&["install", v2_archive.to_str().unwrap()]),
    ));
    assert!(
        text.contains("installed bundle v2-") && text.contains("v1-"),
        "{text}"
    );
    let shown = plant.show();
    let id2 = shown["current"]["id"].as_str().unwrap().to_string();
    let id1 = shown["previous"]["id"].as_str().unwrap().to_string();
    assert!(id2.starts_with("v2-") && id1.starts_with("v1-"), "{shown}");
    assert_eq!(shown["current"]["verified"], true);
    assert_eq!(id2, format!("v2-{}", &v2.manifest_sha256[..16]));

    // A tampered archive (one byte of the weights flipped) is refused; v2 keeps running.
    let v3 = bundle_support::build_onnx_only(&builds, &key, 3);
    let mut tampered = v3.archive.clone();
    let at = data_offset(&tampered, "weights.safetensors") + 4000;
    tampered[at] ^= 0x40;
    let tampered_file = root.join("v3-tampered.tar");
    std::fs::write(&tampered_file, &tampered).unwrap();
    let out = client(&strs(
        &plant.bundle(&["install", tampered_file.to_str().unwrap()]),
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a tampered archive must be refused");
    assert!(
        stderr.contains("bundle refused, the running bundle stays:")
            && stderr.contains("weights.safetensors")
            && stderr.contains("SHA-256"),
        "{stderr}"
    );
    assert_eq!(plant.show()["current"]["id"], id2.as_str());

    // detect --bundle installed: detections.json and an annotated PNG from the bundle's model.
    let image = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/data/deeppcb/group00002/00002/00002001_test.jpg");
    let out_dir = root.join("detections");
    let mut args = vec![
        "detect".to_string(),
        "--bundle".into(),
        "installed".into(),
        "--state".into(),
        plant.state.display().to_string(),
        "--coordinator-key".into(),
        key_file.display().to_string(),
        "--out".into(),
        out_dir.display().to_string(),
        "--min-score".into(),
        "0".into(),
        "--device".into(),
        "cpu".into(),
    ];
    args.push(image.display().to_string());
    let out = client(&strs(&args));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("running bundle {id2}")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file: DetectionsFile =
        serde_json::from_slice(&std::fs::read(out_dir.join("detections.json")).unwrap()).unwrap();
    let names: Vec<String> = (0..6).map(|i| format!("defect{i}")).collect();
    assert_eq!(file.class_names, names);
    assert_eq!(file.images.len(), 1);
    assert!(
        !file.images[0].detections.is_empty(),
        "a random model at --min-score 0 still reports its top peaks"
    );
    image::open(out_dir.join("00002001_test.png")).expect("annotated PNG decodes");

    // detect --bundle <folder> refuses a folder whose file was altered.
    let altered = root.join("altered");
    std::fs::create_dir_all(&altered).unwrap();
    for entry in std::fs::read_dir(&v1.dir).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), altered.join(entry.file_name())).unwrap();
    }
    let weights = altered.join("weights.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    args[2] = altered.display().to_string();
    let out = client(&strs(&args));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an altered bundle must not run");
    assert!(
        stderr.contains("refused, not run") && stderr.contains("weights.safetensors"),
        "{stderr}"
    );

    // triton: the FP32 ONNX as version 2 of the model, with its config.
    let repo = root.join("triton");
    let text = ok(&strs(&plant.bundle(&[
        "--json",
        "triton",
        repo.to_str().unwrap(),
        "--format",
        "onnx-fp32",
    ])));
    let layout: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(layout["platform"], "onnxruntime_onnx");
    let model = repo.join("fedinspect_detector/2/model.onnx");
    assert_eq!(
        std::fs::read(&model).unwrap(),
        std::fs::read(v2.dir.join("model-fp32.onnx")).unwrap()
    );
    let config = std::fs::read_to_string(repo.join("fedinspect_detector/config.pbtxt")).unwrap();
    assert!(
        config.contains("platform: \"onnxruntime_onnx\""),
        "{config}"
    );

    // rollback: v1 runs again, v2 is the previous one.
    let text = ok(&strs(&plant.bundle(&["rollback"])));
    assert!(
        text.contains(&format!("rolled back to bundle {id1}")),
        "{text}"
    );
    let shown = plant.show();
    assert_eq!(shown["current"]["id"], id1.as_str());
    assert_eq!(shown["previous"]["id"], id2.as_str());
}
