//! Issue 8, "Faults": the real `coordinator` process (mTLS on 127.0.0.1, a fresh PKI, sled and
//! blobs on disk) SIGKILLed at a seeded random point in each of many rounds: at a named crash
//! point (`failpoint`: before or after an upload's fsync, after its record, after the ack,
//! mid-aggregation, around the publish, mid-retention), by the test at a random time during
//! the uploads, or idle between rounds. After every crash the process restarts on the same
//! data folder, `coordinator admin check --json` must find nothing, every acknowledged update
//! must be answered "duplicate" when sent again, and unacknowledged ones are sent again under
//! the same update id. At the end every version must be, bit for bit, the canonical FedAvg of
//! exactly its round's three updates over the previous expected version (computed here), with
//! each plant once in its contributions.
//!
//! `FEDINSPECT_FAULT_SEED=<n>` replays a run (the seed is printed first);
//! `FEDINSPECT_FAULT_ROUNDS=<n>` sets the number of rounds (default 48; `scripts/fault_soak.sh`
//! runs more).

mod support;

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use fedinspect_common::delta::Codec;
use fedinspect_common::ModelState;
use fedinspect_coordinator::config::Limits;
use fedinspect_coordinator::failpoint;
use fedinspect_coordinator::rpc::admin_client::AdminCommand;
use fedinspect_coordinator::Config;
use fedinspect_proto::v1 as pb;
use support::*;

const CODEC: Codec = Codec::Q8 { block: 64 };
const PLANTS: [(&str, u64); 3] = [("plant-1", 70), ("plant-2", 20), ("plant-3", 200)];
/// `[round] keep_update_blobs_rounds`: retention runs (and can be crashed) from round 3 on.
const KEEP_ROUNDS: u64 = 2;
/// Tile reads of one aggregation: each of the 3 tensors of each of the 3 updates, one tile.
const TILE_READS: u64 = 9;
/// Random kills land this many milliseconds or fewer after the uploads start.
const KILL_WINDOW_MS: u64 = 60;
const SEED_ENV: &str = "FEDINSPECT_FAULT_SEED";
const ROUNDS_ENV: &str = "FEDINSPECT_FAULT_ROUNDS";

/// What happens to the coordinator in one round.
#[derive(Clone, Debug)]
enum Fault {
    None,
    /// The process is started with `failpoint::ENV` naming this point and count.
    Point(&'static str, u64),
    /// The test SIGKILLs the process this long after the first upload starts.
    Kill(u64),
}

/// One round's plan: its fault and the order in which the plants upload.
#[derive(Clone, Debug)]
struct RoundPlan {
    fault: Fault,
    order: [usize; 3],
}

/// SplitMix64: the plan depends on the seed only.
struct Rng(u64);

/// Counts printed at the end (and by `scripts/fault_soak.sh`).
#[derive(Default)]
struct Tally {
    crashes: BTreeMap<String, u32>,
    restarts: u32,
    checks: u32,
    duplicates: u32,
    start_secs: f64,
}

/// The coordinator process under test, the plants connected to it, and what happened.
struct Harness {
    site: Site,
    config: Config,
    process: Process,
    /// The crash point the running process is armed with (`None`: unarmed).
    armed: Option<String>,
    plants: Option<Vec<Plant>>,
    tally: Tally,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_at_random_points_loses_and_doubles_nothing() {
    let seed = env_u64(SEED_ENV).unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    let rounds = env_u64(ROUNDS_ENV).unwrap_or(48);
    let plan = plan(seed, rounds);
    println!("fault seed {seed} ({SEED_ENV}={seed} replays it), {rounds} rounds");
    for (r, p) in plan.iter().enumerate() {
        println!(
            "  round {:>3}: {} (upload order {:?})",
            r + 1,
            p.fault,
            p.order
        );
    }
    let started = Instant::now();
    let mut h = Harness::new().await;
    for (r, p) in plan.iter().enumerate() {
        h.round(r as u64 + 1, p).await;
    }
    h.check_versions(rounds).await;
    h.check_cli().await;
    let t = &h.tally;
    let crashes: u32 = t.crashes.values().sum();
    println!(
        "fault summary: seed {seed}, rounds {rounds}, crashes {crashes} {:?}, restarts {}, \
         checks {} (0 problems), duplicates answered {}, mismatches 0, \
         mean start {:.2} s, wall {:.1} s",
        t.crashes,
        t.restarts,
        t.checks,
        t.duplicates,
        t.start_secs / f64::from(t.restarts + 1),
        started.elapsed().as_secs_f64()
    );
    h.process.child.kill().unwrap();
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not a whole number; unset it or fix it")),
    )
}

/// Each round's fault, drawn from the seed: 10% none, 20% a kill at a random time, 70% a
/// named point with a count it certainly reaches in that round.
fn plan(seed: u64, rounds: u64) -> Vec<RoundPlan> {
    let mut rng = Rng(seed);
    (1..=rounds)
        .map(|round| {
            let fault = match rng.below(100) {
                0..=9 => Fault::None,
                10..=29 => Fault::Kill(rng.below(KILL_WINDOW_MS + 1)),
                _ => {
                    let points: Vec<&'static str> = failpoint::POINTS
                        .iter()
                        .copied()
                        .filter(|p| *p != failpoint::RETENTION_AFTER_MARK || round > KEEP_ROUNDS)
                        .collect();
                    let point = points[rng.below(points.len() as u64) as usize];
                    let nth = match point {
                        failpoint::AGGREGATE_READ_TILE => 1 + rng.below(TILE_READS),
                        p if p.starts_with("intake.") || p == failpoint::UPLOAD_AFTER_ACK => {
                            1 + rng.below(3)
                        }
                        _ => 1,
                    };
                    Fault::Point(point, nth)
                }
            };
            let mut order = [0, 1, 2];
            for i in (1..3).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            RoundPlan { fault, order }
        })
        .collect()
}

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::None => write!(f, "no fault"),
            Fault::Point(p, n) => write!(f, "{p}:{n}"),
            Fault::Kill(ms) => write!(f, "SIGKILL {ms} ms into the uploads"),
        }
    }
}

impl Fault {
    fn env(&self) -> Option<String> {
        match self {
            Fault::Point(p, n) => Some(format!("{p}:{n}")),
            _ => None,
        }
    }
}

/// Plant `i`'s payload in round `round`, the same bytes on every attempt.
fn payload(i: usize, round: u64) -> Vec<u8> {
    encode(&synthetic_delta(round * 16 + i as u64 + 1, 0.02), CODEC)
}

/// Plant `i`'s update id in round `round`, the same on every attempt.
fn update_id(i: usize, round: u64) -> Vec<u8> {
    let mut id = vec![0xfa; 16];
    id[0] = i as u8 + 1;
    id[1..9].copy_from_slice(&round.to_be_bytes());
    id
}

impl Harness {
    async fn new() -> Self {
        let site = Site::new(3);
        let mut config = site.config("data", policy(3, 3, 600, CODEC), Limits::default());
        config.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut tally = Tally::default();
        let t = Instant::now();
        let process = Process::start_with(&site, &config, &[], &retention()).await;
        tally.start_secs += t.elapsed().as_secs_f64();
        Self {
            site,
            config,
            process,
            armed: None,
            plants: None,
            tally,
        }
    }

    /// Round `round`: arm the process, upload the three updates (again after each crash)
    /// until all are acknowledged, then wait for version `round + 1` through any crash left.
    async fn round(&mut self, round: u64, plan: &RoundPlan) {
        let mut headers = Vec::new();
        for (i, (_, n)) in PLANTS.iter().enumerate() {
            let task = self.task_for(i, round).await;
            let bytes = payload(i, round);
            let mut h = header(&task, &bytes, pb::Codec::Q8, *n, i as u8 + 1);
            h.update_id = update_id(i, round);
            headers.push((h, bytes));
        }
        if let Some(env) = plan.fault.env() {
            // Arming needs a new process: the old one is SIGKILLed while idle (a fault too).
            // Idle: it sent this round's tasks, so the last publish and retention are done.
            self.crash_now("idle between rounds").await;
            self.restart(Some(env)).await;
        }
        let mut killer = match plan.fault {
            Fault::Kill(ms) => Some(self.kill_later(ms)),
            _ => None,
        };
        let mut acked = [false; 3];
        while let Some(why) = self.upload_all(&plan.order, &headers, &mut acked).await {
            if let Some(k) = killer.take() {
                k.await.unwrap(); // the upload was cut by this kill
            }
            self.after_crash(&why, &plan.fault).await;
            self.resend_acked(&headers, &acked).await;
        }
        if let Some(k) = killer {
            k.await.unwrap();
            self.after_crash("the test's SIGKILL", &plan.fault).await;
            self.resend_acked(&headers, &acked).await;
        }
        self.wait_for_version(round + 1, &plan.fault, &headers)
            .await;
        if self.armed.is_some() {
            // A point after the version became visible (e.g. after its record, retention).
            self.after_crash("the planned crash point", &plan.fault)
                .await;
            self.resend_acked(&headers, &acked).await;
            self.wait_for_version(round + 1, &plan.fault, &headers)
                .await;
        }
    }

    /// Uploads every update not yet acknowledged, in `order`; the error of the first one cut.
    async fn upload_all(
        &mut self,
        order: &[usize; 3],
        headers: &[(pb::UpdateHeader, Vec<u8>)],
        acked: &mut [bool; 3],
    ) -> Option<String> {
        self.plants().await;
        let plants = self.plants.as_mut().unwrap();
        for &i in order {
            if acked[i] {
                continue;
            }
            let (h, bytes) = &headers[i];
            match plants[i].upload(h.clone(), bytes, bytes.len()).await {
                Ok(ack) => {
                    acked[i] = true;
                    self.tally.duplicates += u32::from(ack.duplicate);
                }
                Err(e) => return Some(format!("{}'s upload failed: {e}", PLANTS[i].0)),
            }
        }
        None
    }

    /// Every acknowledged update sent again must be answered "duplicate".
    async fn resend_acked(&mut self, headers: &[(pb::UpdateHeader, Vec<u8>)], acked: &[bool; 3]) {
        let plants = self.plants().await;
        let mut answered = 0;
        for (i, (h, bytes)) in headers.iter().enumerate().filter(|(i, _)| acked[*i]) {
            let ack = plants[i]
                .upload(h.clone(), bytes, bytes.len())
                .await
                .unwrap_or_else(|e| {
                    panic!("{}'s acknowledged update sent again: {e}", PLANTS[i].0)
                });
            assert!(
                ack.duplicate,
                "{}'s acknowledged update was lost by the crash: accepted as new",
                PLANTS[i].0
            );
            answered += 1;
        }
        self.tally.duplicates += answered;
    }

    /// Waits until the latest version is `version`, restarting after any crash meanwhile.
    async fn wait_for_version(
        &mut self,
        version: u64,
        fault: &Fault,
        headers: &[(pb::UpdateHeader, Vec<u8>)],
    ) {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.process.child.try_wait().unwrap().is_some() {
                self.after_crash("a crash while aggregating or publishing", fault)
                    .await;
                self.resend_acked(headers, &[true; 3]).await;
                continue;
            }
            let status = admin(&self.site, &self.process.url, AdminCommand::Status).await;
            if let Ok(s) = status {
                let latest = s["latest_version"].as_u64().unwrap();
                assert!(latest <= version, "version {latest} appeared early: {s}");
                if latest == version {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "version {version} not published");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The process has died (or dies now, within the wait): records why, restarts it
    /// unarmed and checks the data folder.
    async fn after_crash(&mut self, why: &str, fault: &Fault) {
        let status = self.process.wait_exit(WAIT).await.unwrap_or_else(|| {
            panic!("{why}, yet the coordinator is still running (fault: {fault})")
        });
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9),
            "the coordinator ended by SIGKILL, not {status}; see its log"
        );
        let point = match self.armed.take() {
            Some(armed) => {
                let point = armed.split(':').next().unwrap().to_string();
                let log = std::fs::read_to_string(self.config.data_dir.with_extension("log"))
                    .unwrap_or_default();
                let said = format!("killing this process at {point}");
                let times = log.matches(&said).count();
                let before = self.tally.crashes.get(&point).copied().unwrap_or(0);
                assert_eq!(times, before as usize + 1, "the log does not say '{said}'");
                point
            }
            None => "random-time SIGKILL (test)".to_string(),
        };
        *self.tally.crashes.entry(point).or_default() += 1;
        self.restart(None).await;
    }

    /// SIGKILLs the running process now (an idle crash between rounds).
    async fn crash_now(&mut self, what: &str) {
        self.process.child.kill().unwrap();
        self.process.child.wait().unwrap();
        *self.tally.crashes.entry(what.to_string()).or_default() += 1;
    }

    /// Starts the process again on the same data folder, armed with `env` if given, checks
    /// the data folder and drops the plants' old connections.
    async fn restart(&mut self, env: Option<String>) {
        let vars: Vec<(&str, &str)> = env
            .as_deref()
            .map(|e| vec![(failpoint::ENV, e)])
            .unwrap_or_default();
        let t = Instant::now();
        self.process = Process::start_with(&self.site, &self.config, &vars, &retention()).await;
        self.tally.start_secs += t.elapsed().as_secs_f64();
        self.tally.restarts += 1;
        self.armed = env;
        self.plants = None;
        self.check_cli().await;
    }

    /// A task that SIGKILLs the running process `ms` milliseconds from now.
    fn kill_later(&self, ms: u64) -> tokio::task::JoinHandle<()> {
        let pid = i32::try_from(self.process.child.id()).unwrap();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            // SAFETY: kill(2) has no memory effects; the child is not reaped before this
            // task ends, so the pid is still ours.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        })
    }

    /// The three plants connected to the running process with their task streams.
    async fn plants(&mut self) -> &mut Vec<Plant> {
        if self.plants.is_none() {
            let mut plants = Vec::new();
            for (id, n) in PLANTS {
                let mut p = Plant::connect(&self.site, &self.process.url, id).await;
                p.join(n).await;
                plants.push(p);
            }
            self.plants = Some(plants);
        }
        self.plants.as_mut().unwrap()
    }

    /// Plant `i`'s train task for `round`, skipping tasks of earlier rounds.
    async fn task_for(&mut self, i: usize, round: u64) -> pb::TrainTask {
        loop {
            let t = self.plants().await[i].next_train().await;
            if t.round == round {
                return t;
            }
            assert!(
                t.round < round,
                "a task for round {} while expecting {round}",
                t.round
            );
        }
    }

    /// `coordinator admin check --json`, the binary: exits 0 and lists no problem.
    async fn check_cli(&mut self) {
        let files = self.site.pki.admin_files();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_coordinator"))
            .args(["admin", "--addr", &self.process.url, "--json"])
            .arg("--ca")
            .arg(&files.ca_cert)
            .arg("--cert")
            .arg(&files.cert)
            .arg("--key")
            .arg(&files.key)
            .arg("check")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "admin check failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(report["problems"], serde_json::json!([]), "{report}");
        assert!(report["models_checked"].as_u64().unwrap() >= 1, "{report}");
        self.tally.checks += 1;
    }

    /// Every version against the independent chain of canonical FedAvgs, and its record.
    async fn check_versions(&mut self, rounds: u64) {
        let url = self.process.url.clone();
        let models = admin(&self.site, &url, AdminCommand::Models { limit: 10_000 })
            .await
            .unwrap();
        let models = models.as_array().unwrap();
        assert_eq!(models.len() as u64, rounds + 1, "one version per round");
        let mut expected = base_model();
        for round in 1..=rounds {
            let version = round + 1;
            let payloads: Vec<Vec<u8>> = (0..3).map(|i| payload(i, round)).collect();
            let uploads: Vec<(&str, u64, &[u8], Codec)> = PLANTS
                .iter()
                .zip(&payloads)
                .map(|((id, n), b)| (*id, *n, b.as_slice(), CODEC))
                .collect();
            expected = expected_fedavg(&expected, &uploads);
            let bytes = self.plants().await[0].download(version).await;
            let (model, _) = ModelState::from_safetensors_bytes(&bytes).unwrap();
            assert!(
                model == expected && model.content_hash() == expected.content_hash(),
                "version {version} is not the canonical FedAvg of round {round}'s updates"
            );
            let record = models.iter().find(|m| m["version"] == version).unwrap();
            assert_eq!(
                (record["parent"].as_u64(), record["round"].as_u64()),
                (Some(round), Some(round))
            );
            let mut contributions: Vec<(String, String)> = record["contributions"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    let id = c["plant_id"].as_str().unwrap().to_string();
                    (id, c["delta_sha256"].as_str().unwrap().to_string())
                })
                .collect();
            contributions.sort();
            let want: Vec<(String, String)> = PLANTS
                .iter()
                .zip(&payloads)
                .map(|((id, _), b)| (id.to_string(), hex::encode(sha256(b))))
                .collect();
            assert_eq!(contributions, want, "version {version}: each plant once");
        }
    }
}

impl Drop for Harness {
    /// On a failure, the end of the coordinator's log (its folder is removed with the site).
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.config.data_dir.with_extension("log"))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("the coordinator's log, last lines:");
            for line in tail.iter().rev() {
                eprintln!("  {line}");
            }
        }
    }
}

/// The `[round]` lines that turn retention on.
fn retention() -> String {
    format!("keep_update_blobs_rounds = {KEEP_ROUNDS}")
}
