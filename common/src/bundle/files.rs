//! File-level helpers shared by building, verifying and unpacking: the names a bundle may hold,
//! streaming SHA-256 of a file, and fsyncing a staged folder before it is renamed into place.

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use ring::digest;

/// Whether `name` may be a file in a bundle: one path component of 1 to 128 characters from
/// `[A-Za-z0-9._-]`, not starting with a dot. This is what keeps unpacking inside its folder.
pub fn is_valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Hex SHA-256 and length of the file at `path`, read in 1 MiB blocks.
pub fn sha256_file(path: &Path) -> io::Result<(String, u64)> {
    let mut file = File::open(path)?;
    let mut ctx = digest::Context::new(&digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hex::encode(ctx.finish().as_ref()), len))
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, bytes).as_ref())
}

/// Fsyncs every file directly inside `dir`, then `dir` itself, so that renaming `dir` publishes
/// durable content.
pub fn sync_tree(dir: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            File::open(entry.path())?.sync_all()?;
        }
    }
    crate::fsutil::sync_dir(dir)
}

/// A fresh, unused sibling path of `target` for staging: `.<name>.<tag>-<pid>-<n>`.
pub fn staging_sibling(target: &Path, tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = target
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bundle".into());
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    parent.join(format!(".{name}.{tag}-{}-{n}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_stay_in_their_folder() {
        for ok in ["model-fp32.onnx", "engine-fp16-sm86-trt10.3.0.plan", "a_b"] {
            assert!(is_valid_file_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/etc/passwd",
            ".hidden",
            "a b",
            "é",
            "a\\b",
        ] {
            assert!(!is_valid_file_name(bad), "{bad}");
        }
        assert!(!is_valid_file_name(&"a".repeat(129)));
    }

    #[test]
    fn sha256_of_a_file_matches_the_in_memory_digest() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        let (hash, len) = sha256_file(&p).unwrap();
        assert_eq!(len, 3);
        // FIPS 180-2 test vector for "abc".
        assert_eq!(
            hash,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(sha256_hex(b"abc"), hash);
    }
}
