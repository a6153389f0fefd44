//! A full and a read-only data directory under a real `coordinator serve` process (issue 8).
//! The data directory is a small tmpfs in a private mount namespace held by a `sleep`
//! process (`unshare --mount`), so the coordinator, started inside it with `nsenter`, can be
//! restarted on the same data; the test fills and empties the disk through
//! `/proc/<holder>/root/...`. Needs root, `unshare`, `nsenter` and tmpfs: where they are
//! missing the tests print why and skip. When sled itself met the full disk, the coordinator
//! restarts itself in place once space returns (`node::disk_recovery`, `node::restart_in_place`):
//! the test restarts nothing and checks the same PID serves again.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fedinspect_common::delta::Codec;
use fedinspect_common::ModelState;
use fedinspect_coordinator::rpc::admin_client::AdminCommand;
use fedinspect_coordinator::Config;
use fedinspect_proto::v1 as pb;
use fedinspect_proto::PROTOCOL_VERSION;
use support::*;
use tokio::time::Instant;
use tonic::Code;

/// Size of the data directory's tmpfs.
const TMPFS_MIB: u64 = 8;

/// Awaits `fut`, failing the test if it takes longer than [`WAIT`].
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {WAIT:?}"))
}

/// [`within`], printing the coordinator's `log` if it times out.
async fn within_or_log<T>(what: &str, log: &Path, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(t) => t,
        Err(_) => {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{what} did not finish within {WAIT:?}; coordinator log:\n{text}")
        }
    }
}

/// Why these tests cannot run here, if they cannot.
fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some(
            "not root: mounting a tmpfs in a private namespace needs CAP_SYS_ADMIN".into(),
        );
    }
    let dir = tempfile::tempdir().ok()?;
    let probe = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=1m tmpfs '{}'",
            dir.path().display()
        ))
        .output();
    match probe {
        Err(e) => Some(format!("cannot run unshare: {e}")),
        Ok(o) if !o.status.success() => Some(format!(
            "unshare --mount with a tmpfs failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => match Command::new("nsenter").arg("--version").output() {
            Ok(o) if o.status.success() => None,
            _ => Some("nsenter is missing".into()),
        },
    }
}

macro_rules! skip_unless_supported {
    () => {
        if let Some(why) = skip_reason() {
            println!("SKIPPED: {why}");
            return;
        }
    };
}

/// A private mount namespace with a tmpfs on `dir`, held open by a sleeping process.
struct Namespace {
    holder: Child,
    dir: PathBuf,
}

impl Namespace {
    /// Mounts a `mib` MiB tmpfs on `dir`; with `read_only`, then bind-mounts it read-only.
    fn new(dir: &Path, mib: u64, read_only: bool) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let ro = if read_only {
            format!(" && mount -o bind,ro '{0}' '{0}'", dir.display())
        } else {
            String::new()
        };
        let script = format!(
            "mount -t tmpfs -o size={mib}m tmpfs '{0}'{ro} && echo mounted && exec sleep 600",
            dir.display()
        );
        let mut holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "mounted", "the namespace's tmpfs is mounted");
        Self {
            holder,
            dir: dir.to_path_buf(),
        }
    }

    /// `path` (under the namespace's tmpfs) as this process reaches it.
    fn inside(&self, path: &Path) -> PathBuf {
        let rel = path.strip_prefix("/").unwrap();
        PathBuf::from(format!("/proc/{}/root", self.holder.id())).join(rel)
    }

    /// Writes a ballast file until the tmpfs is full; returns the bytes written.
    fn fill(&self) -> u64 {
        let path = self.inside(&self.dir.join("ballast"));
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0xA5u8; 64 * 1024];
        let mut written = 0u64;
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("writing the ballast: {e}"),
            }
        }
        let _ = f.sync_all();
        written
    }

    fn empty(&self) {
        std::fs::remove_file(self.inside(&self.dir.join("ballast"))).unwrap();
    }

    /// Runs `args` (a `mount`/`umount` command line) in the namespace.
    fn run_inside(&self, args: &[&str]) {
        let out = Command::new("nsenter")
            .arg("-t")
            .arg(self.holder.id().to_string())
            .args(["-m", "--"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?} in the namespace: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Makes the data directory read-only for every path opened from now on (a read-only bind
    /// mount over it, as an operator's or the kernel's remount would); files already open stay
    /// writable, as they do under a real remount that succeeds.
    fn make_read_only(&self) {
        let dir = self.dir.to_str().unwrap();
        self.run_inside(&["mount", "-o", "bind,ro", dir, dir]);
    }

    /// Undoes [`Namespace::make_read_only`].
    fn make_writable(&self) {
        self.run_inside(&["umount", self.dir.to_str().unwrap()]);
    }

    /// Runs `coordinator serve --config <toml>` inside the namespace, output in `log`.
    fn serve(&self, toml: &Path, log: &Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        Command::new("nsenter")
            .arg("-t")
            .arg(self.holder.id().to_string())
            .args(["-m", "--"])
            .arg(env!("CARGO_BIN_EXE_coordinator"))
            .args(["serve", "--config"])
            .arg(toml)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A coordinator process in the namespace, killed on drop.
struct Served(Child);

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes `config` as TOML beside its data folder.
fn write_toml(config: &Config) -> PathBuf {
    let toml = config.data_dir.with_extension("toml");
    let q = |p: &Path| format!("\"{}\"", p.display());
    let r = &config.round;
    let text = format!(
        "listen = \"{}\"\ndata_dir = {}\nsigning_key = {}\ninitial_model = {}\n\
         [tls]\nca = {}\ncert = {}\nkey = {}\n\
         [round]\nmin_participants = {}\ntarget_participants = {}\ndeadline_secs = {}\ncodec = \"f32\"\n\
         [storage]\nrestart_when_disk_recovers = {}\ndisk_probe_interval_secs = {}\n\
         disk_free_margin_mib = {}\nrestart_grace_secs = {}\n{}",
        config.listen,
        q(&config.data_dir),
        q(&config.signing_key),
        q(config.initial_model.as_ref().unwrap()),
        q(&config.tls.ca_cert),
        q(&config.tls.cert),
        q(&config.tls.key),
        r.min_participants,
        r.target_participants,
        r.deadline.as_secs(),
        config.storage.restart_when_disk_recovers,
        config.storage.disk_probe_interval.as_secs(),
        config.storage.disk_free_margin_bytes >> 20,
        config.storage.restart_grace.as_secs(),
        config
            .metrics_listen
            .map(|at| format!("[metrics]\nlisten = \"{at}\"\n"))
            .unwrap_or_default(),
    );
    std::fs::write(&toml, text).unwrap();
    toml
}

/// Waits until the coordinator at `url` answers the admin `Status`, or its process ended.
async fn wait_serving(site: &Site, url: &str, child: &mut Child) -> Result<(), String> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Err(format!("the coordinator exited: {status}"));
        }
        if let Ok(Ok(_)) = tokio::time::timeout(
            Duration::from_secs(2),
            admin(site, url, AdminCommand::Status),
        )
        .await
        {
            return Ok(());
        }
        assert!(Instant::now() < deadline, "the coordinator did not serve");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn log_of(config: &Config) -> PathBuf {
    config.data_dir.with_extension("log")
}

/// Registers and opens the task stream of both plants; returns them with their train tasks
/// (the coordinator's log, `log`, is printed if one does not come).
async fn join(site: &Site, url: &str, log: &Path) -> (Vec<Plant>, Vec<pb::TrainTask>) {
    let mut plants = Vec::new();
    for id in ["plant-1", "plant-2"] {
        let mut p = within("connecting", Plant::connect(site, url, id)).await;
        within("joining", p.join(100)).await;
        plants.push(p);
    }
    let mut tasks = Vec::new();
    for p in &mut plants {
        let stream = p.tasks.as_mut().unwrap();
        let task = within_or_log("a train task", log, stream.message()).await;
        match task.unwrap().and_then(|t| t.kind) {
            Some(pb::task::Kind::Train(t)) => tasks.push(t),
            other => panic!("expected a train task, got {other:?}"),
        }
    }
    (plants, tasks)
}

/// Uploads until the answer is not ABORTED (a broken stream's claim not yet released).
async fn upload(
    p: &mut Plant,
    h: &pb::UpdateHeader,
    payload: &[u8],
) -> Result<pb::UploadUpdateResponse, tonic::Status> {
    let deadline = Instant::now() + WAIT;
    loop {
        match within("uploading", p.upload(h.clone(), payload, payload.len())).await {
            Err(s) if s.code() == Code::Aborted && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => return other,
        }
    }
}

/// Starts the coordinator of `config` in `ns`, waits until it serves.
async fn serve(site: &Site, ns: &Namespace, config: &Config) -> (Served, String) {
    let toml = write_toml(config);
    let url = format!("https://127.0.0.1:{}", config.listen.port());
    let mut served = Served(ns.serve(&toml, &log_of(config)));
    if let Err(e) = wait_serving(site, &url, &mut served.0).await {
        let log = std::fs::read_to_string(log_of(config)).unwrap_or_default();
        panic!("{e}\n{log}");
    }
    (served, url)
}

fn site_config(site: &Site) -> Config {
    let mut config = site.config("data", policy(2, 2, 120, Codec::F32), Default::default());
    config.listen = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    config.metrics_listen = Some(format!("127.0.0.1:{}", free_port()).parse().unwrap());
    // Probed every second; the 8 MiB tmpfs counts as usable with 1 MiB free.
    config.storage.disk_probe_interval = Duration::from_secs(1);
    config.storage.disk_free_margin_bytes = 1 << 20;
    config.storage.restart_grace = Duration::from_secs(1);
    config
}

fn payloads_and_headers(tasks: &[pb::TrainTask]) -> (Vec<Vec<u8>>, Vec<pb::UpdateHeader>) {
    let payloads: Vec<Vec<u8>> = (1..=2)
        .map(|s| encode(&synthetic_delta(s, 0.01), Codec::F32))
        .collect();
    let headers = (0..2)
        .map(|i| header(&tasks[i], &payloads[i], pb::Codec::F32, 100, i as u8 + 1))
        .collect();
    (payloads, headers)
}

/// Version 2 is published, is the canonical FedAvg of both payloads, has both plants as
/// contributors, and `admin check` finds nothing wrong.
async fn assert_recovered(site: &Site, url: &str, plant: &mut Plant, payloads: &[Vec<u8>]) {
    within("publishing version 2", wait_for_version(site, url, 2)).await;
    let bytes = within("downloading version 2", plant.download(2)).await;
    let (model, _) = ModelState::from_safetensors_bytes(&bytes).unwrap();
    let expected = expected_fedavg(
        &base_model(),
        &[
            ("plant-1", 100, &payloads[0], Codec::F32),
            ("plant-2", 100, &payloads[1], Codec::F32),
        ],
    );
    assert_eq!(
        model, expected,
        "bit for bit the canonical FedAvg of both updates"
    );
    let models = within(
        "admin models",
        admin(site, url, AdminCommand::Models { limit: 10 }),
    )
    .await
    .unwrap();
    let v2 = models
        .as_array()
        .and_then(|m| m.iter().find(|v| v["version"] == 2))
        .unwrap_or_else(|| panic!("version 2 listed: {models}"));
    assert_eq!(
        v2["contributions"].as_array().map(Vec::len),
        Some(2),
        "{v2}"
    );
    let check = within("admin check", admin(site, url, AdminCommand::Check))
        .await
        .unwrap();
    println!("admin check after recovery: {check}");
    assert_eq!(
        check["problems"].as_array().map(Vec::len),
        Some(0),
        "{check}"
    );
}

/// A fault on the data directory of a serving coordinator: plant-1's update is accepted,
/// `fault` is applied (it returns how to describe it), plant-2's upload is refused with `code`
/// and a message naming `says`, reads are still served, `undo` ends the fault, and the same
/// update is then accepted without a restart, losing nothing.
async fn refused_then_recovered(
    code: Code,
    says: &str,
    fault: impl FnOnce(&Namespace) -> String,
    undo: impl FnOnce(&Namespace),
) {
    let site = Site::new(2);
    let config = site_config(&site);
    let ns = Namespace::new(&config.data_dir, TMPFS_MIB, false);
    let (_served, url) = serve(&site, &ns, &config).await;
    let (mut plants, tasks) = join(&site, &url, &log_of(&config)).await;
    let (payloads, headers) = payloads_and_headers(&tasks);
    upload(&mut plants[0], &headers[0], &payloads[0])
        .await
        .expect("plant-1's upload before the fault");

    let what = fault(&ns);
    let s = match upload(&mut plants[1], &headers[1], &payloads[1]).await {
        Err(s) => s,
        Ok(r) => panic!("{what}: the upload was accepted ({r:?}), not refused"),
    };
    println!("{what}: {:?}: {}", s.code(), s.message());
    assert_eq!(s.code(), code, "{}", s.message());
    assert!(s.message().contains(says), "{}", s.message());
    let status = within("admin status", admin(&site, &url, AdminCommand::Status))
        .await
        .expect("reads are served during the fault");
    assert_eq!(status["round_state"], "collecting", "{status}");

    undo(&ns);
    let r = upload(&mut plants[1], &headers[1], &payloads[1])
        .await
        .expect("the same update is accepted once the fault is gone");
    assert!(!r.duplicate);
    assert_recovered(&site, &url, &mut plants[0], &payloads).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_uploads_loses_nothing_and_recovers() {
    skip_unless_supported!();
    refused_then_recovered(
        Code::ResourceExhausted,
        "disk is full",
        |ns| {
            let ballast = ns.fill();
            format!("disk full ({ballast} bytes of ballast in a {TMPFS_MIB} MiB tmpfs)")
        },
        Namespace::empty,
    )
    .await;
}

/// Waits until the coordinator's log (`log`) has a line containing `needle`; returns it.
async fn log_line(log: &Path, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains(needle)) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with '{needle}' within {WAIT:?}; coordinator log:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A small registration of `id` on a fresh connection, `Ok` once the coordinator writes again.
async fn register_fresh(site: &Site, url: &str, id: &str) -> Result<(), String> {
    let files = files_of(site, id);
    let ch = channel(url, &files.ca_cert, &files.cert, &files.key)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut client = fedinspect_proto::v1::federation_client::FederationClient::new(ch);
    let req = pb::RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        capabilities: Some(pb::Capabilities {
            device: "cpu".into(),
            num_samples: 100,
            ..Default::default()
        }),
        ..Default::default()
    };
    client
        .register(req)
        .await
        .map(|_| ())
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

/// The coordinator's `/metrics` text (plain HTTP on `at`).
fn scrape(at: std::net::SocketAddr) -> String {
    use std::io::Read;
    let mut conn = std::net::TcpStream::connect(at).unwrap();
    conn.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: {at}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    conn.read_to_string(&mut text).unwrap();
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_write_on_a_full_disk_restarts_in_place_once_space_returns_and_loses_nothing() {
    skip_unless_supported!();
    let site = Site::new(2);
    let config = site_config(&site);
    let log = log_of(&config);
    let ns = Namespace::new(&config.data_dir, TMPFS_MIB, false);
    let (mut served, url) = serve(&site, &ns, &config).await;
    let pid = served.0.id();
    let (mut plants, tasks) = join(&site, &url, &log).await;
    let (payloads, headers) = payloads_and_headers(&tasks);
    upload(&mut plants[0], &headers[0], &payloads[0])
        .await
        .expect("plant-1's upload before the disk fills");

    // A registration with a large capabilities record makes sled write past its log's
    // allocated space: the database itself meets ENOSPC.
    ns.fill();
    let big = pb::RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        capabilities: Some(pb::Capabilities {
            device: "x".repeat(300_000),
            num_samples: 100,
            ..Default::default()
        }),
        ..Default::default()
    };
    let s = within("a large registration", plants[1].client.register(big))
        .await
        .expect_err("a database write onto a full disk is refused");
    println!(
        "database write on a full disk: {:?}: {}",
        s.code(),
        s.message()
    );
    assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
    assert!(s.message().contains("disk is full"), "{}", s.message());

    // sled keeps its I/O error (its next flush would never complete): the store remembers the
    // failure and refuses every later write at once, instead of letting it wait on sled.
    let small = pb::RegisterRequest {
        protocol_version: PROTOCOL_VERSION,
        capabilities: Some(pb::Capabilities {
            device: "cpu".into(),
            num_samples: 100,
            ..Default::default()
        }),
        ..Default::default()
    };
    let probe = tokio::time::timeout(
        Duration::from_secs(3),
        plants[1].client.register(small.clone()),
    )
    .await;
    println!(
        "a registration while the database refuses writes: {}",
        match &probe {
            Err(_) => "no answer within 3 s (sled's flush waits forever)".to_string(),
            Ok(Ok(_)) => "served".to_string(),
            Ok(Err(s)) => format!("{:?}: {}", s.code(), s.message()),
        }
    );
    match probe {
        Ok(Err(s)) => assert!(
            s.code() == Code::ResourceExhausted && s.message().contains("restart"),
            "{:?}: {}",
            s.code(),
            s.message()
        ),
        Ok(Ok(_)) => panic!("a write was served by a database that had failed"),
        Err(_) => panic!("a write to the failed database hung instead of being refused"),
    }
    let status = within("admin status", admin(&site, &url, AdminCommand::Status))
        .await
        .expect("reads are served while the database refuses writes");
    assert_eq!(status["round_state"], "collecting", "{status}");
    // The disk watch saw the problem and found the disk still full: no restart yet.
    println!("{}", log_line(&log, "probing data_dir").await);
    println!("{}", log_line(&log, "does not take writes yet").await);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !text.contains("took writes again"),
        "restarted while the disk was full:\n{text}"
    );

    // Space returns; the test restarts nothing.
    ns.empty();
    let space_returned = Instant::now();
    let deadline = space_returned + WAIT;
    let mut last = String::new();
    while let Err(e) = register_fresh(&site, &url, "plant-2").await {
        last = e;
        assert!(
            Instant::now() < deadline,
            "writes not served again within {WAIT:?} of space returning; last: {last}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!(
        "space returned -> a registration (a database write) served again after {:.2} s (last refusal meanwhile: {})",
        space_returned.elapsed().as_secs_f64(),
        if last.is_empty() { "none" } else { &last }
    );
    assert!(
        served.0.try_wait().unwrap().is_none(),
        "the coordinator process (PID {pid}) ended"
    );
    println!("{}", log_line(&log, "took writes again").await);
    let restarted = log_line(&log, "restarted in place (same PID").await;
    println!("{restarted}");
    assert!(
        restarted.contains(&format!("same PID {pid})")),
        "the coordinator restarted as another process than {pid}: {restarted}"
    );
    let audit = within(
        "admin audit",
        admin(
            &site,
            &url,
            AdminCommand::Audit(fedinspect_coordinator::rpc::admin_client::AuditQuery {
                kind: "other".into(),
                plant: String::new(),
                limit: 20,
            }),
        ),
    )
    .await
    .unwrap();
    let entry = audit
        .as_array()
        .and_then(|a| a.iter().find(|e| e["action"] == "restart_in_place"))
        .unwrap_or_else(|| panic!("no restart_in_place audit entry: {audit}"));
    println!("audit entry after the restart: {entry}");
    let detail = entry["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("PID {pid},")), "{detail}");
    assert!(detail.contains("full disk"), "{detail}");
    let metrics = scrape(config.metrics_listen.unwrap());
    let counted = metrics
        .lines()
        .find(|l| l.starts_with("fedinspect_restarts_in_place_total"))
        .unwrap_or_else(|| panic!("no restart counter in /metrics:\n{metrics}"));
    println!("metrics after the restart: {counted}");
    assert_eq!(counted, "fedinspect_restarts_in_place_total 1");

    // The plants reconnect; round 1 resumed from sled, and they send what they trained for it
    // (a resumed round tasks nobody again).
    drop(plants);
    let mut plants = Vec::new();
    for id in ["plant-1", "plant-2"] {
        let mut p = within("reconnecting", Plant::connect(&site, &url, id)).await;
        within("joining again", p.join(100)).await;
        plants.push(p);
    }
    let r = upload(&mut plants[1], &headers[1], &payloads[1])
        .await
        .expect("plant-2's refused update is accepted after the restart in place");
    assert!(!r.duplicate);
    let again = upload(&mut plants[0], &headers[0], &payloads[0])
        .await
        .expect("plant-1's update survived the restart");
    assert!(again.duplicate, "plant-1's update was kept: {again:?}");
    assert_recovered(&site, &url, &mut plants[0], &payloads).await;
    assert!(
        served.0.try_wait().unwrap().is_none(),
        "the same process (PID {pid}) still serves"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_made_read_only_while_serving_refuses_uploads_and_recovers() {
    skip_unless_supported!();
    refused_then_recovered(
        Code::Unavailable,
        "read-only",
        |ns| {
            ns.make_read_only();
            "read-only data directory while serving".to_string()
        },
        Namespace::make_writable,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_data_dir_stops_start_up_with_a_clear_message() {
    skip_unless_supported!();
    let site = Site::new(1);
    let config = site_config(&site);
    let ns = Namespace::new(&config.data_dir, TMPFS_MIB, true);
    let toml = write_toml(&config);
    let mut child = ns.serve(&toml, &log_of(&config));
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the coordinator started on a read-only data_dir"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(log_of(&config)).unwrap();
    println!("start-up on a read-only data_dir ({status}):\n{log}");
    assert!(log.contains("read-only"), "{log}");
    assert!(
        log.contains(&config.data_dir.display().to_string()),
        "{log}"
    );
}
