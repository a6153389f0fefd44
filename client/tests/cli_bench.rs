//! `client bench --json` on the real binary, at a size that runs in a few seconds: the last
//! line of stdout is one JSON object whose figures describe the run that was asked for.

use std::process::Command;

use serde_json::Value;

fn positive(v: &Value, key: &str) -> f64 {
    let x = v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"));
    assert!(x.is_finite() && x > 0.0, "{key} = {x} in {v}");
    x
}

#[test]
fn bench_prints_its_figures_as_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_client"))
        .args([
            "bench",
            "--device",
            "cpu",
            "--width",
            "0.25",
            "--train-batch",
            "2",
            "--train-crop",
            "64",
            "--train-steps",
            "2",
            "--infer-size",
            "64",
            "--infer-batches",
            "1",
            "--infer-iters",
            "2",
            "--json",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .expect("the client binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client bench failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.trim_end().lines().last().unwrap_or_default();
    let report: Value = serde_json::from_str(last).expect("the last line is JSON");

    assert!(
        report["device"].as_str().is_some_and(|d| !d.is_empty()),
        "{report}"
    );
    assert!(
        report["threads"].as_i64().is_some_and(|t| t >= 1),
        "{report}"
    );
    assert!(report["params"].as_u64().is_some_and(|p| p > 0), "{report}");
    positive(&report, "gmac_per_crop");

    let train = &report["train"];
    assert_eq!(train["batch"].as_u64(), Some(2), "{report}");
    assert_eq!(train["crop"].as_u64(), Some(64), "{report}");
    assert_eq!(train["steps"].as_u64(), Some(2), "{report}");
    assert_eq!(
        train["mixed_precision"].as_bool(),
        Some(false),
        "CPU: {report}"
    );
    positive(train, "seconds");
    positive(train, "images_per_sec");
    positive(train, "median_step_images_per_sec");
    positive(train, "last_loss");

    let infer = report["infer"].as_array().expect("infer is a list");
    assert_eq!(infer.len(), 1, "{report}");
    let one = &infer[0];
    assert_eq!(one["batch"].as_u64(), Some(1), "{report}");
    assert_eq!(one["size"].as_u64(), Some(64), "{report}");
    assert_eq!(one["calls"].as_u64(), Some(2), "{report}");
    let (min, median, p99) = (
        positive(one, "min_ms"),
        positive(one, "median_ms"),
        positive(one, "p99_ms"),
    );
    assert!(min <= median && median <= p99, "{one}");
    positive(one, "median_ms_per_image");
    positive(one, "images_per_sec");
}
