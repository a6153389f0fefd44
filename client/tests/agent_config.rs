//! `plant.toml` resolution: a good file with relative paths, the signing key generated once
//! with mode 0600 and reused, every problem reported at once, certificate problems reported
//! with the TLS error at start-up, the example file parsing, and an agent built from a config.

use std::path::{Path, PathBuf};

use fedinspect_client::agent::Agent;
use fedinspect_client::config::{Config, ConfigError, DataSource, RawConfig, SIGNING_KEY_FILE};
use fedinspect_common::pki::{self, InitOptions, PkiLayout, Validity};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/deeppcb")
}

/// A plant.toml in `dir` naming the PKI in `dir/pki` by relative paths.
fn good_toml(extra: &str) -> String {
    format!(
        r#"
[coordinator]
address = "https://127.0.0.1:50051"
public_key = "pki/coordinator-signing.pub"

[tls]
ca = "pki/ca.pem"
cert = "pki/plants/plant-1.pem"
key = "pki/plants/plant-1.key"

[state]
dir = "state"

[data]
deeppcb = "{}"
validation_fraction = 0.0

[model]
input_size = 64
width = 0.25
fpn_width = 16
head_width = 16

[training]
device = "cpu"
threads = 1
{extra}
"#,
        fixtures().display()
    )
}

fn site() -> (tempfile::TempDir, PkiLayout) {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki::init(&dir.path().join("pki"), &InitOptions::with_plant_count(1)).unwrap();
    (dir, pki)
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("plant.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn problems(err: ConfigError) -> Vec<String> {
    match err {
        ConfigError::Invalid { problems, .. } => problems,
        other => panic!("expected an invalid config, got {other}"),
    }
}

#[test]
fn a_good_file_resolves_and_the_signing_key_is_generated_once() {
    let (dir, _pki) = site();
    let path = write(dir.path(), &good_toml(""));
    let config = Config::load(&path).unwrap();
    assert_eq!(config.plant_id, "plant-1");
    assert_eq!(config.state_dir, dir.path().join("state"));
    assert_eq!(config.coordinator.address, "https://127.0.0.1:50051");
    assert_eq!(config.model.input_size, 64);
    assert_eq!(
        config.training.crop_size, 64,
        "crop defaults to min(320, input)"
    );
    assert_eq!(config.training.batch_size, None, "follows the round plan");
    assert!(matches!(config.data.source, DataSource::DeepPcb { .. }));

    let key_path = dir.path().join("state").join(SIGNING_KEY_FILE);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let again = Config::load(&path).unwrap();
    assert_eq!(
        again.signing_key.verifying_key(),
        config.signing_key.verifying_key(),
        "the key is reused, not regenerated"
    );
}

#[test]
fn every_problem_is_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"
[coordinator]
address = "http://coordinator:50051"

[tls]
ca = "missing/ca.pem"

[data]
deeppcb = "nowhere"
coco = "nowhere.json"

[model]
input_size = 100

[training]
device = "tpu"
batch_size = 0
"#;
    let err = Config::load(&write(dir.path(), text)).unwrap_err();
    let text = err.to_string();
    let p = problems(err);
    for needle in [
        "coordinator.address: 'http://coordinator:50051' is not an https URL",
        "coordinator.public_key: missing",
        "tls.ca: ",
        "tls.cert: missing",
        "tls.key: missing",
        "state.dir: missing",
        "data: set either deeppcb or coco, not both",
        "model.input_size: 100",
        "training.device: 'tpu'",
        "training.batch_size: must be at least 1",
        "training.crop_size",
    ] {
        assert!(
            p.iter().any(|x| x.contains(needle)),
            "no problem mentions {needle:?}:\n{text}"
        );
    }
    assert!(text.contains(&format!("{} problem(s)", p.len())), "{text}");
}

#[test]
fn unknown_fields_and_bad_toml_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = Config::load(&write(dir.path(), "[coordinator]\nadress = \"x\"\n")).unwrap_err();
    assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
    assert!(err.to_string().contains("adress"), "{err}");
}

#[test]
fn a_bad_certificate_fails_at_start_with_its_tls_error() {
    let (dir, pki) = site();
    // An expired plant certificate from the same CA.
    pki::issue_test_plant(
        pki.root(),
        "plant-1",
        Validity::expired(),
        &pki.root().join("plants"),
    )
    .unwrap();
    let err = Config::load(&write(dir.path(), &good_toml(""))).unwrap_err();
    let p = problems(err);
    assert!(
        p.iter()
            .any(|x| x.starts_with("tls: ") && x.contains("expired")),
        "{p:?}"
    );

    // The admin's certificate is not a plant's.
    let text = good_toml("")
        .replace("pki/plants/plant-1.pem", "pki/admin.pem")
        .replace("pki/plants/plant-1.key", "pki/admin.key");
    let p = problems(Config::load(&write(dir.path(), &text)).unwrap_err());
    assert!(
        p.iter()
            .any(|x| x.starts_with("tls: ") && x.contains("plant")),
        "{p:?}"
    );
}

#[test]
fn the_example_file_is_valid_toml_for_a_plant() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("plant.example.toml");
    let raw: RawConfig = toml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(
        raw.coordinator.address.as_deref(),
        Some("https://coordinator.example:50051")
    );
    assert!(raw.data.deeppcb.is_some());
}

#[test]
fn an_agent_is_built_from_a_config_and_reports_its_data() {
    tch::set_num_threads(1);
    let (dir, _pki) = site();
    let config = Config::load(&write(dir.path(), &good_toml(""))).unwrap();
    let agent = Agent::build(config).unwrap();
    let caps = agent.capabilities();
    assert_eq!(caps.device, "cpu");
    assert_eq!(
        caps.num_samples, 3,
        "the fixture's trainval.txt lists 3 pairs"
    );
    assert_eq!(
        caps.samples_per_class.len(),
        6,
        "every DeepPCB class is listed"
    );
    assert!(caps.samples_per_class.values().sum::<u64>() >= 3);

    // A group filter that matches nothing is refused with the groups that exist.
    let text = good_toml("").replace(
        "validation_fraction = 0.0",
        "validation_fraction = 0.0\ngroups = [\"group99999\"]",
    );
    let config = Config::load(&write(dir.path(), &text)).unwrap();
    let err = Agent::build(config).err().expect("no item in the group");
    assert!(err.to_string().contains("group00001"), "{err}");
}
