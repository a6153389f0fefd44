//! The `fedinspect-certs` binary end to end: init, refusal without --force, enrol, show.

use std::path::Path;
use std::process::{Command, Output};

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fedinspect-certs"))
        .args(args)
        .output()
        .expect("run fedinspect-certs")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn init_enrol_show() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let d = dir.to_str().unwrap();

    let out = run(&[
        "init",
        "--out",
        d,
        "--plant-names",
        "lyon,graz",
        "--admin",
        "ops",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(Path::new(d).join("plants/graz.pem").exists());

    let out = run(&["init", "--out", d]);
    assert!(!out.status.success());
    assert!(text(&out).contains("--force"), "{}", text(&out));

    let out = run(&["enrol", "--ca", d, "--plant", "oslo"]);
    assert!(out.status.success(), "{}", text(&out));

    let out = run(&["show", dir.join("plants/oslo.pem").to_str().unwrap()]);
    let shown = text(&out);
    assert!(out.status.success(), "{shown}");
    assert!(shown.contains("identity:    plant oslo"), "{shown}");
    assert!(shown.contains("status:      valid"), "{shown}");

    let out = run(&["show", dir.join("ca.pem").to_str().unwrap()]);
    assert!(
        text(&out).contains("none (a CA certificate)"),
        "{}",
        text(&out)
    );

    let out = run(&["init", "--out", d, "--plants", "2", "--plant-names", "a"]);
    assert!(
        !out.status.success(),
        "--plants and --plant-names together must be refused"
    );
}
