//! The evaluation gate of `admin promote` with `[promotion]` configured, against a real
//! coordinator over mutual TLS on loopback: the evaluator is a shell script written by the
//! test that looks the exported model file's SHA-256 up in a score table and prints a JSON
//! line like `client eval --json`. Promotion passes within `max_map50_drop`, is refused
//! (FAILED_PRECONDITION) beyond it, `--force` overrides it with an audit entry saying what was
//! overridden; scores are stored in sled and not recomputed; a failing and a hanging
//! evaluator refuse promotion with their stderr and the time limit in the message (the hanging
//! one's whole process group killed); `evaluate_on_publish` scores versions as they appear.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fedinspect_common::delta::Codec;
use fedinspect_coordinator::config::Limits;
use fedinspect_coordinator::gate::{PromotionGate, RawPromotion};
use fedinspect_coordinator::rpc::admin_client::{AdminClientError, AdminCommand, AuditQuery};
use fedinspect_coordinator::storage::Store;
use fedinspect_coordinator::Config;
use fedinspect_proto::v1 as pb;
use support::*;

/// An evaluator script and the files it reads and writes, in `dir`.
struct Evaluator {
    dir: PathBuf,
}

impl Evaluator {
    /// Writes `evaluate.sh` with `body` after a prologue that sets `model` (its only argument)
    /// and counts the call in `calls`.
    fn new(dir: &Path, body: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let script = dir.join("evaluate.sh");
        let text = format!(
            "#!/bin/sh\nmodel=\"$1\"\necho call >> \"{d}/calls\"\n{body}\n",
            d = dir.display()
        );
        std::fs::write(&script, text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// Prints the score the table `scores` gives the model file's SHA-256.
    fn scoring(dir: &Path) -> Self {
        Self::new(
            dir,
            &format!(
                "hash=$(sha256sum \"$model\" | cut -d' ' -f1)\n\
                 score=$(grep \"^$hash \" \"{d}/scores\" | cut -d' ' -f2)\n\
                 [ -n \"$score\" ] || {{ echo \"no score for model $hash\" >&2; exit 3; }}\n\
                 echo \"evaluated $model\" >&2\n\
                 echo 'loading validation set'\n\
                 printf '{{\"map_50\":%s,\"map_50_95\":0.5,\"map_33\":%s,\"images\":4}}\\n' \"$score\" \"$score\"",
                d = dir.display()
            ),
        )
    }

    fn gate(&self, max_drop: f64, timeout_secs: u64, on_publish: bool) -> PromotionGate {
        PromotionGate::resolve(
            RawPromotion {
                eval_command: Some(vec![
                    self.dir.join("evaluate.sh").display().to_string(),
                    "{model}".into(),
                ]),
                max_map50_drop: Some(max_drop),
                timeout_secs: Some(timeout_secs),
                evaluate_on_publish: Some(on_publish),
            },
            &self.dir,
            None,
        )
        .unwrap()
    }

    /// Scores for the models whose files hash to these digests (hex).
    fn set_scores(&self, scores: &[(&str, f64)]) {
        let text: String = scores.iter().map(|(h, s)| format!("{h} {s}\n")).collect();
        std::fs::write(self.dir.join("scores"), text).unwrap();
    }

    fn calls(&self) -> usize {
        std::fs::read_to_string(self.dir.join("calls"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }
}

fn config_with_gate(site: &Site, gate: PromotionGate) -> Config {
    let mut config = site.config("data", policy(1, 1, 30, Codec::F32), Limits::default());
    config.round.promotion_gate = Some(gate);
    config
}

/// Runs one round with `plant` (joined) and waits for `version`; returns the hex SHA-256 of
/// the version's file as plants download it.
async fn publish(site: &Site, url: &str, plant: &mut Plant, seed: u64, version: u64) -> String {
    let task = plant.next_train().await;
    let payload = encode(&synthetic_delta(seed, 0.01), Codec::F32);
    let h = header(&task, &payload, pb::Codec::F32, 40, seed as u8);
    plant.upload(h, &payload, payload.len()).await.unwrap();
    wait_for_version(site, url, version).await;
    hex::encode(sha256(&plant.download(version).await))
}

async fn promote(
    site: &Site,
    url: &str,
    version: u64,
    force: bool,
) -> Result<serde_json::Value, String> {
    match admin(site, url, AdminCommand::Promote { version, force }).await {
        Ok(v) => Ok(v),
        Err(AdminClientError::Refused { code, message }) => {
            assert_eq!(code, tonic::Code::FailedPrecondition, "{message}");
            Err(message)
        }
        Err(e) => panic!("promote {version}: {e}"),
    }
}

async fn audit(site: &Site, url: &str, kind: &str) -> Vec<serde_json::Value> {
    let q = AuditQuery {
        kind: kind.into(),
        plant: String::new(),
        limit: 100,
    };
    let v = admin(site, url, AdminCommand::Audit(q)).await.unwrap();
    v.as_array().unwrap().clone()
}

async fn promoted_version(site: &Site, url: &str) -> u64 {
    let s = admin(site, url, AdminCommand::Status).await.unwrap();
    s["promoted_version"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_passes_within_the_threshold_is_refused_beyond_it_and_force_is_audited() {
    let site = Site::new(1);
    let eval = Evaluator::scoring(&site.dir.path().join("evaluator"));
    let config = config_with_gate(&site, eval.gate(0.01, 60, false));
    let running = start(&config).await;
    let url = url(&running);
    let mut plant = Plant::connect(&site, &url, "plant-1").await;
    plant.join(40).await;
    let v1 = hex::encode(sha256(&plant.download(1).await));
    let v2 = publish(&site, &url, &mut plant, 1, 2).await;
    let v3 = publish(&site, &url, &mut plant, 2, 3).await;
    // Version 2 drops 0.005 (allowed at 0.01); version 3 drops 0.095 below version 2.
    eval.set_scores(&[(&v1, 0.9), (&v2, 0.895), (&v3, 0.8)]);

    promote(&site, &url, 2, false).await.unwrap();
    assert_eq!(promoted_version(&site, &url).await, 2);
    assert_eq!(eval.calls(), 2, "versions 2 and 1 evaluated once each");
    let promotions = audit(&site, &url, "promotion").await;
    let detail = promotions[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("version 2 promoted (force: false)")
            && detail.contains("validation map_50 0.8950 against version 1's 0.9000"),
        "{detail}"
    );

    let refused = promote(&site, &url, 3, false).await.unwrap_err();
    assert!(
        refused.contains("version 3 scores map_50 0.8000 on the validation set, 0.0950 below the promoted version 2's 0.8950")
            && refused.contains("max_map50_drop allows 0.01")
            && refused.contains("--force"),
        "{refused}"
    );
    assert_eq!(promoted_version(&site, &url).await, 2);
    assert_eq!(eval.calls(), 3, "only version 3 was new");
    // Asking again reads the stored scores.
    promote(&site, &url, 3, false).await.unwrap_err();
    assert_eq!(eval.calls(), 3, "stored evaluations are not recomputed");
    let refusals = audit(&site, &url, "refusal").await;
    assert!(
        refusals[0]["action"] == "promote"
            && refusals[0]["detail"]
                .as_str()
                .unwrap()
                .contains("0.0950 below"),
        "{refusals:?}"
    );

    promote(&site, &url, 3, true).await.unwrap();
    assert_eq!(promoted_version(&site, &url).await, 3);
    assert_eq!(eval.calls(), 3, "--force evaluates nothing");
    let promotions = audit(&site, &url, "promotion").await;
    let detail = promotions[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("version 3 promoted (force: true)")
            && detail.contains("evaluation gate overridden: validation map_50 0.8000 against version 2's 0.8950 (drop 0.0950"),
        "{detail}"
    );

    let data = config.data_dir.clone();
    running.stop(Duration::from_secs(10)).await.unwrap();
    // Durable: the scores are in sled, with the command that produced them.
    let store = Store::open(&data.join("db")).unwrap();
    let e3 = store
        .evaluation(3)
        .unwrap()
        .expect("version 3's evaluation is stored");
    assert_eq!((e3.version, e3.map_50, e3.map_33), (3, 0.8, Some(0.8)));
    assert!(e3.command[0].ends_with("evaluate.sh"), "{:?}", e3.command);
    assert_eq!(store.evaluation(1).unwrap().unwrap().map_50, 0.9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_evaluator_refuses_promotion_with_its_stderr() {
    let site = Site::new(1);
    let eval = Evaluator::new(
        &site.dir.path().join("evaluator"),
        "echo 'reading /srv/validation/PCBData' >&2\necho 'error: test.txt not found in /srv/validation/PCBData' >&2\nexit 2",
    );
    let running = start(&config_with_gate(&site, eval.gate(0.01, 60, false))).await;
    let url = url(&running);
    let mut plant = Plant::connect(&site, &url, "plant-1").await;
    plant.join(40).await;
    publish(&site, &url, &mut plant, 1, 2).await;

    let refused = promote(&site, &url, 2, false).await.unwrap_err();
    assert!(
        refused.contains("evaluating version 2 on the validation set failed")
            && refused.contains("exit status 2")
            && refused.contains("error: test.txt not found in /srv/validation/PCBData")
            && refused.contains("--force"),
        "{refused}"
    );
    assert_eq!(promoted_version(&site, &url).await, 1);

    // An evaluator that succeeds without a JSON line is refused too, naming what it printed.
    let _ = Evaluator::new(&eval.dir, "echo 'mAP@0.5 0.97'");
    let refused = promote(&site, &url, 2, false).await.unwrap_err();
    assert!(
        refused.contains("holds no JSON object") && refused.contains("mAP@0.5 0.97"),
        "{refused}"
    );
    assert_eq!(promoted_version(&site, &url).await, 1);
    running.stop(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_evaluator_is_killed_at_the_time_limit_and_refuses_promotion() {
    let site = Site::new(1);
    let dir = site.dir.path().join("evaluator");
    let eval = Evaluator::new(
        &dir,
        &format!(
            "echo 'evaluating...' >&2\nsleep 60 &\necho $! > \"{}/sleep.pid\"\nwait",
            dir.display()
        ),
    );
    let running = start(&config_with_gate(&site, eval.gate(0.01, 1, false))).await;
    let url = url(&running);
    let mut plant = Plant::connect(&site, &url, "plant-1").await;
    plant.join(40).await;
    publish(&site, &url, &mut plant, 1, 2).await;

    let started = Instant::now();
    let refused = promote(&site, &url, 2, false).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(
        refused.contains("did not finish within promotion.timeout_secs = 1 and was killed")
            && refused.contains("evaluating..."),
        "{refused}"
    );
    assert_eq!(promoted_version(&site, &url).await, 1);
    // The script's child was killed with it (the whole process group).
    let pid = std::fs::read_to_string(dir.join("sleep.pid")).unwrap();
    let stat = format!("/proc/{}/stat", pid.trim());
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_to_string(&stat).is_ok_and(|s| !s.contains(") Z ")) {
        assert!(
            Instant::now() < deadline,
            "the evaluator's child {pid} still runs"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.stop(Duration::from_secs(10)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evaluate_on_publish_scores_each_new_version_before_anyone_promotes_it() {
    let site = Site::new(1);
    let eval = Evaluator::new(
        &site.dir.path().join("evaluator"),
        "printf '{\"map_50\":0.6}\\n'",
    );
    let running = start(&config_with_gate(&site, eval.gate(0.0, 60, true))).await;
    let url = url(&running);
    let hub = running.hub().clone();
    let evaluated = |version: u64| {
        let hub = hub.clone();
        async move {
            let deadline = Instant::now() + WAIT;
            while hub.store.evaluation(version).unwrap().is_none() {
                assert!(
                    Instant::now() < deadline,
                    "version {version} was not evaluated"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    // The version there at start, then each version published.
    evaluated(1).await;
    let mut plant = Plant::connect(&site, &url, "plant-1").await;
    plant.join(40).await;
    publish(&site, &url, &mut plant, 1, 2).await;
    evaluated(2).await;
    assert_eq!(eval.calls(), 2);

    promote(&site, &url, 2, false).await.unwrap();
    assert_eq!(eval.calls(), 2, "promotion used the stored scores");
    assert_eq!(promoted_version(&site, &url).await, 2);
    running.stop(Duration::from_secs(10)).await.unwrap();
}
