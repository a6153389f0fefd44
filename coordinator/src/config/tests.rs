//! Config tests: defaults and path resolution, every problem reported at once, the example file.

use super::*;

fn files(dir: &Path) {
    for f in ["ca.pem", "c.pem", "c.key", "s.key"] {
        std::fs::write(dir.join(f), "x").unwrap();
    }
}

const MINIMAL: &str = r#"
    listen = "127.0.0.1:0"
    data_dir = "data"
    signing_key = "s.key"
    [tls]
    ca = "ca.pem"
    cert = "c.pem"
    key = "c.key"
"#;

#[test]
fn minimal_file_gets_defaults_and_resolved_paths() {
    let dir = tempfile::tempdir().unwrap();
    files(dir.path());
    let raw: RawConfig = toml::from_str(MINIMAL).unwrap();
    let c = Config::from_raw(raw, dir.path()).unwrap();
    assert_eq!(c.data_dir, dir.path().join("data"));
    assert_eq!(c.tls.ca_cert, dir.path().join("ca.pem"));
    assert_eq!(c.round, RoundPolicy::default());
    assert_eq!(c.limits, Limits::default());
}

#[test]
fn every_problem_is_reported_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let raw: RawConfig = toml::from_str(
        r#"
        listen = "nowhere"
        [round]
        min_participants = 3
        target_participants = 2
        learning_rate = -1.0
        codec = "bf16"
        q8_block = 0
        [limits]
        delta_norm_bound = 0.0
        norm_action = "ignore"
        "#,
    )
    .unwrap();
    let problems = Config::from_raw(raw, dir.path()).unwrap_err();
    let text = problems.join("\n");
    for needle in [
        "listen: 'nowhere'",
        "data_dir: missing",
        "tls.ca: missing",
        "tls.cert: missing",
        "tls.key: missing",
        "signing_key: missing",
        "target_participants: 2 is below",
        "learning_rate",
        "round.codec: 'bf16'",
        "q8_block: 0",
        "delta_norm_bound",
        "norm_action: 'ignore'",
    ] {
        assert!(text.contains(needle), "missing '{needle}' in:\n{text}");
    }
    assert_eq!(problems.len(), 12, "{text}");
}

#[test]
fn q8_takes_the_block_size_and_clip_parses() {
    let dir = tempfile::tempdir().unwrap();
    files(dir.path());
    let text = format!(
        "{MINIMAL}\n[round]\ncodec = \"q8\"\nq8_block = 64\n[limits]\ndelta_norm_bound = 5.0\nnorm_action = \"clip\"\n"
    );
    let c = Config::from_raw(toml::from_str(&text).unwrap(), dir.path()).unwrap();
    assert_eq!(c.round.codec, Codec::Q8 { block: 64 });
    assert_eq!(c.limits.delta_norm_bound, Some(5.0));
    assert_eq!(c.limits.norm_action, NormAction::Clip);
}

#[test]
fn unknown_fields_are_refused() {
    assert!(toml::from_str::<RawConfig>("[round]\nmin_participant = 2\n").is_err());
}

#[test]
fn example_file_parses() {
    let text = include_str!("../../coordinator.example.toml");
    toml::from_str::<RawConfig>(text).unwrap();
}

#[test]
fn metrics_sampling_and_retention_keys_are_read_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    files(dir.path());
    let text = format!(
        "{MINIMAL}\n[round]\nsample_fraction = 0.25\nsample_seed = 9\nkeep_update_blobs_rounds = 3\n[metrics]\nlisten = \"127.0.0.1:9464\"\n"
    );
    let c = Config::from_raw(toml::from_str(&text).unwrap(), dir.path()).unwrap();
    assert_eq!(c.metrics_listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert_eq!(c.round.sample_fraction, 0.25);
    assert_eq!(c.round.sample_seed, 9);
    assert_eq!(c.round.keep_update_blobs_rounds, Some(3));
    let minimal = Config::from_raw(toml::from_str(MINIMAL).unwrap(), dir.path()).unwrap();
    assert_eq!(minimal.metrics_listen, None, "no [metrics], no endpoint");

    let bad = format!(
        "{MINIMAL}\n[round]\nsample_fraction = 0.0\nkeep_update_blobs_rounds = 0\n[metrics]\nlisten = \"nowhere\"\n"
    );
    let problems = Config::from_raw(toml::from_str(&bad).unwrap(), dir.path()).unwrap_err();
    assert_eq!(problems.len(), 3, "{problems:#?}");
    assert!(problems
        .iter()
        .any(|p| p.starts_with("round.sample_fraction")));
    assert!(problems
        .iter()
        .any(|p| p.starts_with("round.keep_update_blobs_rounds")));
    assert!(problems.iter().any(|p| p.starts_with("metrics.listen")));
}
