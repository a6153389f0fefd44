//! The bundle targets' entry functions: the manifest parser and checks as `verify_bundle`
//! runs them, and `unpack` of a tar stream followed by `verify_bundle` and a pack/unpack round
//! trip, each in a scratch folder of its own.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::Outcome;
use crate::bundle::{
    is_valid_file_name, pack, sign_manifest, unpack, verify_bundle, BundleError, BundleManifest,
    UnpackLimits, VerifiedBundle, MANIFEST_FILE, SIGNATURE_FILE,
};
use crate::signing::{SigningKey, VerifyingKey};

/// Archive flag bit: sign whatever `manifest.json` the archive held with the harness key
/// before verifying, so mutated manifests get past the signature to the listing and hashes.
pub const ARCHIVE_RESIGN: u8 = 1;

/// Smaller than the defaults so that a fuzz input cannot make one run write gigabytes.
pub const ARCHIVE_LIMITS: UnpackLimits = UnpackLimits {
    max_entries: 16,
    max_file_bytes: 1 << 20,
    max_total_bytes: 4 << 20,
};

/// The folder `unpack` writes into, two levels down in the scratch folder so that an entry
/// escaping by one or two levels is seen.
const DEST: &str = "up/bundle";
/// Name of the folder a verified bundle is packed and unpacked into again.
const AGAIN: &str = "again";

/// The manifest parser and checks as a plant runs them: `data` becomes `manifest.json`,
/// signed with the harness key, and the folder goes through `verify_bundle`. Checks: the
/// harness signature is never refused; a manifest the verifier parses also parses with
/// serde and passes `check`, and its pretty JSON form parses to the same manifest.
pub fn bundle_manifest(data: &[u8]) -> Outcome {
    let scratch = Scratch::new();
    let dir = scratch.dir(DEST);
    write_signed(&dir, data);
    match verify_bundle(&dir, harness_key()) {
        // Listed files are absent, so getting as far as the listing means the manifest parsed.
        Ok(_) | Err(BundleError::MissingFile { .. }) => {}
        Err(
            e @ (BundleError::ManifestMalformed { .. }
            | BundleError::UnsupportedFormat { .. }
            | BundleError::ManifestTooLarge { .. }),
        ) => return Outcome::refused(e),
        Err(e) => panic!("verifying a manifest signed by the harness failed early: {e}"),
    }
    let manifest: BundleManifest = serde_json::from_slice(data)
        .unwrap_or_else(|e| panic!("verify_bundle parsed a manifest that serde refuses: {e}"));
    if let Err(problems) = manifest.check() {
        panic!("verify_bundle accepted a manifest that check refuses: {problems:?}");
    }
    let pretty = serde_json::to_vec_pretty(&manifest)
        .unwrap_or_else(|e| panic!("an accepted manifest does not serialise: {e}"));
    let again: BundleManifest = serde_json::from_slice(&pretty)
        .unwrap_or_else(|e| panic!("a manifest we wrote does not parse: {e}"));
    assert_eq!(manifest, again, "a manifest changed on a JSON round trip");
    let dir = scratch.dir(AGAIN);
    write_signed(&dir, &pretty);
    match verify_bundle(&dir, harness_key()) {
        Ok(_) | Err(BundleError::MissingFile { .. }) => Outcome::Accepted,
        Err(e) => panic!("a manifest we wrote is refused: {e}"),
    }
}

/// `unpack` of a tar stream, then `verify_bundle`. Byte 0 holds flags ([`ARCHIVE_RESIGN`]);
/// the rest is the archive. Checks: nothing is written outside the destination folder and only
/// plain files inside it, the names returned are exactly what was written, and a bundle that
/// verifies packs and unpacks into a bundle that verifies with the same manifest.
pub fn bundle_archive(data: &[u8]) -> Outcome {
    let Some((&flags, tar)) = data.split_first() else {
        return Outcome::unusable("empty input (byte 0 holds the archive flags)");
    };
    let scratch = Scratch::new();
    let dest = scratch.dir(DEST);
    let unpacked = unpack(tar, &dest, &ARCHIVE_LIMITS);
    scratch.assert_only("", &["up"]);
    scratch.assert_only("up", &["bundle"]);
    let listing = plain_files(&dest);
    let names = match unpacked {
        Ok(names) => names,
        Err(e @ BundleError::Io { .. }) => panic!("unpack failed on I/O in a scratch folder: {e}"),
        Err(e) => return Outcome::refused(e),
    };
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(sorted, listing, "unpack's names are not what it wrote");
    let resigned = flags & ARCHIVE_RESIGN != 0;
    if resigned {
        if let Ok(manifest) = fs::read(dest.join(MANIFEST_FILE)) {
            write_signature(&dest, &manifest);
        }
    }
    let verified = match verify_bundle(&dest, harness_key()) {
        Ok(v) => v,
        Err(
            e @ (BundleError::BadSignature { .. }
            | BundleError::WrongKey { .. }
            | BundleError::Io { .. }),
        ) if resigned => panic!("a bundle re-signed by the harness failed its signature: {e}"),
        Err(e) => return Outcome::refused(e),
    };
    assert_repacks(&scratch, &verified);
    Outcome::Accepted
}

/// Packs `verified` and unpacks it into a fresh folder, which must verify to the same manifest.
fn assert_repacks(scratch: &Scratch, verified: &VerifiedBundle) {
    let mut stream = Vec::new();
    let n = pack(verified, &mut stream)
        .unwrap_or_else(|e| panic!("a verified bundle does not pack: {e}"));
    assert_eq!(n, stream.len() as u64, "pack miscounted its bytes");
    let again = scratch.dir(AGAIN);
    let names = unpack(stream.as_slice(), &again, &ARCHIVE_LIMITS)
        .unwrap_or_else(|e| panic!("a packed bundle does not unpack: {e}"));
    let expected: Vec<String> = [MANIFEST_FILE, SIGNATURE_FILE]
        .into_iter()
        .map(str::to_string)
        .chain(verified.manifest.files.iter().map(|f| f.name.clone()))
        .collect();
    assert_eq!(
        names, expected,
        "pack wrote other entries than the bundle's"
    );
    let reverified = verify_bundle(&again, harness_key())
        .unwrap_or_else(|e| panic!("a repacked bundle does not verify: {e}"));
    assert_eq!(reverified.manifest, verified.manifest);
    assert_eq!(reverified.manifest_sha256, verified.manifest_sha256);
}

/// The names of the entries of `dir`, sorted; panics on anything but a plain file with a
/// valid bundle file name.
fn plain_files(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).expect("the scratch folder lists") {
        let entry = entry.expect("the scratch folder lists");
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry.file_type().expect("a scratch entry has a type");
        assert!(kind.is_file(), "unpack created '{name}', not a plain file");
        assert!(is_valid_file_name(&name), "unpack created '{name}'");
        names.push(name);
    }
    names.sort();
    names
}

fn write_signed(dir: &Path, manifest: &[u8]) {
    fs::write(dir.join(MANIFEST_FILE), manifest).expect("the scratch folder is writable");
    write_signature(dir, manifest);
}

/// Replaces `manifest.sig` in `dir` with the harness key's signature of `manifest`.
fn write_signature(dir: &Path, manifest: &[u8]) {
    let sig = sign_manifest(manifest, harness_signing_key());
    let bytes = serde_json::to_vec(&sig).expect("a signature serialises");
    let path = dir.join(SIGNATURE_FILE);
    let _ = fs::remove_file(&path);
    fs::write(path, bytes).expect("the scratch folder is writable");
}

/// The harness's bundle signing key: fresh per process, the same for every input of it.
fn harness_signing_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate().expect("the system RNG works"))
}

fn harness_key() -> &'static VerifyingKey {
    static KEY: OnceLock<VerifyingKey> = OnceLock::new();
    KEY.get_or_init(|| harness_signing_key().verifying_key())
}

/// A folder of its own per input, removed afterwards (not after a crash: libFuzzer aborts).
/// It lives under `$FEDINSPECT_FUZZ_SCRATCH`, else `/dev/shm` (fsync is free there), else the
/// system temporary folder.
pub(super) struct Scratch {
    root: PathBuf,
}

impl Scratch {
    pub(super) fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = std::env::var_os("FEDINSPECT_FUZZ_SCRATCH")
            .map(PathBuf::from)
            .or_else(|| Some(PathBuf::from("/dev/shm")).filter(|p| p.is_dir()))
            .unwrap_or_else(std::env::temp_dir);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let root = base.join(format!("fedinspect-fuzz-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root)
            .unwrap_or_else(|e| panic!("cannot create scratch folder {}: {e}", root.display()));
        Self { root }
    }

    /// A new empty folder `name` inside the scratch folder.
    pub(super) fn dir(&self, name: &str) -> PathBuf {
        let dir = self.root.join(name);
        fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create scratch folder {}: {e}", dir.display()));
        dir
    }

    /// Panics unless folder `sub` of the scratch folder holds exactly the entries `names`.
    fn assert_only(&self, sub: &str, names: &[&str]) {
        let mut found: Vec<String> = fs::read_dir(self.root.join(sub))
            .expect("the scratch folder lists")
            .map(|e| {
                e.expect("the scratch folder lists")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        found.sort();
        assert_eq!(
            found, names,
            "something was written outside the destination folder"
        );
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.root);
    }
}
