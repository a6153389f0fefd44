//! Ctrl-C on `simulate run`: the real binary on the tiny experiment gets SIGINT once its
//! plants have registered (round 1 under way). It must say it is stopping, end with the
//! interruption as its error (not whatever a half-stopped federation failed with next) and
//! leave no coordinator or plant process behind. Linux: the leftovers are looked for in
//! /proc.

#![cfg(target_os = "linux")]

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod support;

#[test]
fn sigint_stops_the_run_and_every_process_it_started() {
    // Fails early, with the reason, when the client and coordinator were not built.
    support::binaries_dir();
    let dir = tempfile::tempdir().unwrap();
    let experiment = Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/tiny.toml");
    let out = dir.path().join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_simulate"))
        .arg("run")
        .arg(&experiment)
        .arg("--out")
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("simulate starts");

    let (lines, seen) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            all.push_str(&line);
            all.push('\n');
            let _ = lines.send(line);
        }
        all
    });
    let mut stderr = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let started = Instant::now();
    loop {
        match seen.recv_timeout(Duration::from_secs(240)) {
            Ok(line) if line.contains("every plant registered") => break,
            Ok(_) => {}
            Err(e) => {
                let _ = child.kill();
                panic!(
                    "no 'every plant registered' from simulate after {:?} ({e})",
                    started.elapsed()
                );
            }
        }
    }
    let marker = out.to_string_lossy().into_owned();
    let running = processes_mentioning(&marker);
    assert!(
        running.len() >= 5,
        "simulate, the coordinator and 3 plants should be found running under {marker}: {running:?}"
    );
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on the child this test started and has not reaped.
    let sent = unsafe { libc::kill(pid, libc::SIGINT) };
    assert_eq!(
        sent,
        0,
        "SIGINT to simulate: {}",
        std::io::Error::last_os_error()
    );

    let deadline = Instant::now() + Duration::from_secs(120);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("simulate still running 120 s after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = reader.join().unwrap();
    let stderr = errors.join().unwrap();
    assert!(
        !exit.success(),
        "an interrupted run must not exit 0\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("stopping: shutting the coordinator and plants down"),
        "{stderr}"
    );
    assert!(
        stderr.contains("interrupted; the coordinator and plants were stopped"),
        "the error names the interruption:\n{stderr}"
    );
    assert!(
        !stdout.contains("written to"),
        "an interrupted run writes no report:\n{stdout}"
    );

    // The coordinator and the plants ran with their files under `out`; none may be left.
    let leftovers = processes_mentioning(&marker);
    assert!(
        leftovers.is_empty(),
        "processes left running after the interrupted run: {leftovers:?}"
    );
}

/// Command lines of running processes that contain `text`.
fn processes_mentioning(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(text) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}
