//! A bundle as one tar stream, what `DownloadBundle` sends: [`pack`] writes a verified bundle
//! deterministically (manifest, signature, then the files in manifest order; ustar headers,
//! mode 0644, owner 0, mtime 0), so the same bundle always gives the same bytes and a broken
//! download resumes at an offset. [`unpack`] reads one into an empty folder and refuses, before
//! writing anything of the entry, links and other non-files, names that are not a single plain
//! component (path traversal, absolute paths, hidden files), duplicates, oversized entries and
//! too many entries. Unpacking proves nothing: verify the folder afterwards.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

use super::files::is_valid_file_name;
use super::verify::VerifiedBundle;
use super::{BundleError, MANIFEST_FILE, MAX_MANIFEST_BYTES, SIGNATURE_FILE};

/// Bounds on what [`unpack`] accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnpackLimits {
    pub max_entries: usize,
    pub max_file_bytes: u64,
    pub max_total_bytes: u64,
}

impl Default for UnpackLimits {
    /// 64 entries, 2 GiB per file, 8 GiB in all: far above a real bundle (a few MB of ONNX
    /// and engines of tens of MB), far below what would fill a plant's disk unnoticed.
    fn default() -> Self {
        Self {
            max_entries: 64,
            max_file_bytes: 2 << 30,
            max_total_bytes: 8 << 30,
        }
    }
}

/// Writes `bundle` as a tar stream into `out`; returns the bytes written.
pub fn pack(bundle: &VerifiedBundle, out: impl Write) -> Result<u64, BundleError> {
    let mut counter = CountingWriter { inner: out, n: 0 };
    {
        let mut builder = tar::Builder::new(&mut counter);
        let names = [MANIFEST_FILE, SIGNATURE_FILE]
            .into_iter()
            .chain(bundle.manifest.files.iter().map(|f| f.name.as_str()));
        for name in names {
            let path = bundle.path(name);
            let file = File::open(&path).map_err(|e| BundleError::io("read", &path, e))?;
            let size = file
                .metadata()
                .map_err(|e| BundleError::io("inspect", &path, e))?
                .len();
            let mut header = tar::Header::new_ustar();
            header
                .set_path(name)
                .map_err(|e| BundleError::io("name archive entry for", &path, e))?;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(size);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_cksum();
            builder
                .append(&header, file.take(size))
                .map_err(|e| BundleError::io("pack", &path, e))?;
        }
        builder
            .finish()
            .map_err(|e| BundleError::io("pack", bundle.dir.clone(), e))?;
    }
    counter
        .flush()
        .map_err(|e| BundleError::io("pack", bundle.dir.clone(), e))?;
    Ok(counter.n)
}

/// Reads a tar stream into `dest`, an existing empty folder; returns the entry names in
/// archive order. Every file written is fsynced.
pub fn unpack(
    input: impl Read,
    dest: &Path,
    limits: &UnpackLimits,
) -> Result<Vec<String>, BundleError> {
    let listing = fs::read_dir(dest).map_err(|e| BundleError::io("open", dest, e))?;
    if listing.count() != 0 {
        return Err(BundleError::DestinationExists {
            path: dest.to_path_buf(),
        });
    }
    let mut archive = tar::Archive::new(input);
    let entries = archive.entries().map_err(archive_error)?;
    let mut names = Vec::new();
    let mut seen = BTreeSet::new();
    let mut total = 0u64;
    for entry in entries {
        let mut entry = entry.map_err(archive_error)?;
        let raw_name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let refuse = |reason: String| BundleError::ArchiveEntry {
            entry: raw_name.clone(),
            reason,
        };
        if names.len() == limits.max_entries {
            return Err(refuse(format!(
                "more than {} entries; a bundle has a handful of files",
                limits.max_entries
            )));
        }
        let kind = entry.header().entry_type();
        if kind != tar::EntryType::Regular {
            return Err(refuse(format!(
                "it is {}, but bundles hold plain files only",
                describe(kind)
            )));
        }
        if !is_valid_file_name(&raw_name) {
            return Err(refuse(
                "not a plain file name (path separators, '..', absolute paths and hidden \
                 names are refused)"
                    .into(),
            ));
        }
        if !seen.insert(raw_name.clone()) {
            return Err(refuse("the archive holds it twice".into()));
        }
        let size = entry.header().size().map_err(archive_error)?;
        let limit = if raw_name == MANIFEST_FILE || raw_name == SIGNATURE_FILE {
            MAX_MANIFEST_BYTES
        } else {
            limits.max_file_bytes
        };
        if size > limit {
            return Err(refuse(format!("{size} bytes, over the {limit}-byte limit")));
        }
        total += size;
        if total > limits.max_total_bytes {
            return Err(refuse(format!(
                "the archive exceeds {} bytes in all",
                limits.max_total_bytes
            )));
        }
        write_entry(&mut entry, &dest.join(&raw_name), size).map_err(|e| match e {
            EntryError::Io(path, source) => BundleError::io("write", path, source),
            EntryError::Short(got) => refuse(format!(
                "the stream ends after {got} of its {size} bytes (truncated download)"
            )),
        })?;
        names.push(raw_name);
    }
    crate::fsutil::sync_dir(dest).map_err(|e| BundleError::io("sync", dest, e))?;
    Ok(names)
}

enum EntryError {
    Io(std::path::PathBuf, io::Error),
    Short(u64),
}

fn write_entry(entry: &mut impl Read, path: &Path, size: u64) -> Result<(), EntryError> {
    let io_err = |e| EntryError::Io(path.to_path_buf(), e);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    while copied < size {
        let n = match entry.read(&mut buf) {
            Ok(0) => return Err(EntryError::Short(copied)),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(EntryError::Short(copied))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(e)),
        };
        file.write_all(&buf[..n]).map_err(io_err)?;
        copied += n as u64;
    }
    file.sync_all().map_err(io_err)
}

fn archive_error(e: io::Error) -> BundleError {
    BundleError::Archive {
        reason: e.to_string(),
    }
}

fn describe(kind: tar::EntryType) -> &'static str {
    match kind {
        tar::EntryType::Symlink => "a symbolic link",
        tar::EntryType::Link => "a hard link",
        tar::EntryType::Directory => "a directory",
        tar::EntryType::Char | tar::EntryType::Block => "a device",
        tar::EntryType::Fifo => "a fifo",
        _ => "not a regular file",
    }
}

struct CountingWriter<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
