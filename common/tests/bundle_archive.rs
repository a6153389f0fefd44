//! The bundle's tar stream: deterministic packing, a round trip that verifies, and refusals of
//! hostile or broken archives (path traversal, absolute names, links, directories, duplicates,
//! oversized entries, too many entries, truncation anywhere in the stream).

mod bundle_support;

use std::fs;
use std::path::Path;

use bundle_support::*;
use fedinspect_common::bundle::{
    pack, unpack, verify_bundle, BundleError, UnpackLimits, VerifiedBundle, MANIFEST_FILE,
    SIGNATURE_FILE,
};
use fedinspect_common::signing::SigningKey;

fn packed_bundle(dir: &Path) -> (SigningKey, VerifiedBundle, Vec<u8>) {
    let key = SigningKey::generate().unwrap();
    let out = dir.join("bundle");
    build_small(&out, &key, 4, &mut no_engines());
    let bundle = verify_bundle(&out, &key.verifying_key()).unwrap();
    let mut bytes = Vec::new();
    let n = pack(&bundle, &mut bytes).unwrap();
    assert_eq!(n, bytes.len() as u64);
    (key, bundle, bytes)
}

#[test]
fn pack_is_deterministic_and_unpacks_to_a_verifying_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let (key, bundle, bytes) = packed_bundle(dir.path());
    let mut again = Vec::new();
    pack(&bundle, &mut again).unwrap();
    assert_eq!(
        bytes, again,
        "packing the same bundle twice gave different bytes"
    );

    let dest = dir.path().join("unpacked");
    fs::create_dir(&dest).unwrap();
    let names = unpack(&bytes[..], &dest, &UnpackLimits::default()).unwrap();
    let mut expected = vec![MANIFEST_FILE.to_string(), SIGNATURE_FILE.to_string()];
    expected.extend(bundle.manifest.files.iter().map(|f| f.name.clone()));
    assert_eq!(names, expected);
    let back = verify_bundle(&dest, &key.verifying_key()).unwrap();
    assert_eq!(back.manifest, bundle.manifest);
    assert_eq!(back.manifest_sha256, bundle.manifest_sha256);
}

/// A tar stream with one entry whose raw name, type and content are as given (written
/// byte by byte, since the tar crate's builder refuses hostile names).
fn hostile_tar(entries: &[(&[u8], tar::EntryType, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, data) in entries {
        let mut header = tar::Header::new_ustar();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_entry_type(*kind);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        if matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link) {
            header.set_link_name("/etc/passwd").unwrap();
        }
        header.set_cksum();
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

fn unpack_err(bytes: &[u8], limits: &UnpackLimits) -> (BundleError, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let err = unpack(bytes, &dest, limits).unwrap_err();
    (err, dir)
}

#[test]
fn path_traversal_and_odd_names_are_refused_without_writing_outside() {
    for name in [
        &b"../evil"[..],
        b"/tmp/fedinspect-evil",
        b"sub/file",
        b"./manifest.json",
        b".hidden",
        b"..",
    ] {
        let bytes = hostile_tar(&[(name, tar::EntryType::Regular, b"owned")]);
        let (err, dir) = unpack_err(&bytes, &UnpackLimits::default());
        let shown = String::from_utf8_lossy(name);
        assert!(
            matches!(&err, BundleError::ArchiveEntry { entry, .. } if *entry == shown),
            "{shown}: {err}"
        );
        assert!(!dir.path().join("evil").exists());
        assert_eq!(fs::read_dir(dir.path().join("dest")).unwrap().count(), 0);
    }
    assert!(!Path::new("/tmp/fedinspect-evil").exists());
}

#[test]
fn links_directories_and_devices_are_refused() {
    for (kind, word) in [
        (tar::EntryType::Symlink, "symbolic link"),
        (tar::EntryType::Link, "hard link"),
        (tar::EntryType::Directory, "directory"),
        (tar::EntryType::Fifo, "fifo"),
    ] {
        let bytes = hostile_tar(&[(b"weights.safetensors", kind, b"")]);
        let (err, dir) = unpack_err(&bytes, &UnpackLimits::default());
        assert!(err.to_string().contains(word), "{word}: {err}");
        assert_eq!(fs::read_dir(dir.path().join("dest")).unwrap().count(), 0);
    }
}

#[test]
fn duplicates_oversized_entries_and_too_many_entries_are_refused() {
    let r = tar::EntryType::Regular;
    let bytes = hostile_tar(&[(b"a.onnx", r, b"1"), (b"a.onnx", r, b"2")]);
    let (err, _d) = unpack_err(&bytes, &UnpackLimits::default());
    assert!(err.to_string().contains("twice"), "{err}");

    let limits = UnpackLimits {
        max_file_bytes: 10,
        ..UnpackLimits::default()
    };
    let bytes = hostile_tar(&[(b"big.onnx", r, &[7u8; 11])]);
    let (err, dir) = unpack_err(&bytes, &limits);
    assert!(err.to_string().contains("over the 10-byte limit"), "{err}");
    assert!(!dir.path().join("dest/big.onnx").exists());

    let limits = UnpackLimits {
        max_total_bytes: 15,
        ..UnpackLimits::default()
    };
    let bytes = hostile_tar(&[(b"a.onnx", r, &[1u8; 10]), (b"b.onnx", r, &[1u8; 10])]);
    let (err, _d) = unpack_err(&bytes, &limits);
    assert!(err.to_string().contains("in all"), "{err}");

    let limits = UnpackLimits {
        max_entries: 1,
        ..UnpackLimits::default()
    };
    let bytes = hostile_tar(&[(b"a.onnx", r, b"1"), (b"b.onnx", r, b"2")]);
    let (err, _d) = unpack_err(&bytes, &limits);
    assert!(err.to_string().contains("more than 1 entries"), "{err}");

    // A manifest has its own, small limit whatever the file limit.
    let bytes = hostile_tar(&[(b"manifest.json", r, &vec![b' '; (1 << 20) + 1])]);
    let (err, _d) = unpack_err(&bytes, &UnpackLimits::default());
    assert!(err.to_string().contains("limit"), "{err}");
}

#[test]
fn unpacking_into_a_non_empty_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("x"), b"").unwrap();
    let bytes = hostile_tar(&[(b"a.onnx", tar::EntryType::Regular, b"1")]);
    let err = unpack(&bytes[..], dir.path(), &UnpackLimits::default()).unwrap_err();
    assert!(
        matches!(err, BundleError::DestinationExists { .. }),
        "{err}"
    );
}

#[test]
fn a_stream_cut_anywhere_never_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (key, _bundle, bytes) = packed_bundle(dir.path());
    // Cuts at block boundaries (between entries and inside headers) and inside data.
    let mut cuts: Vec<usize> = (0..bytes.len()).step_by(bytes.len() / 17).collect();
    cuts.extend((1..bytes.len() / 512).map(|b| b * 512).step_by(61));
    cuts.extend([1, 511, 513, bytes.len() - 1025, bytes.len() - 1]);
    // Exactly between two entries: unpacking sees a shorter archive, verifying must not.
    let boundaries = entry_starts(&bytes);
    assert_eq!(
        boundaries.len(),
        5,
        "manifest, signature, two ONNX files and the weights"
    );
    cuts.extend(&boundaries[1..]);
    let mut by_unpack = 0;
    for cut in cuts {
        let dest = dir.path().join(format!("cut{cut}"));
        fs::create_dir(&dest).unwrap();
        match unpack(&bytes[..cut], &dest, &UnpackLimits::default()) {
            Err(_) => by_unpack += 1,
            Ok(_) => {
                let verified = verify_bundle(&dest, &key.verifying_key());
                // Only a cut inside the two zero blocks that end the archive loses nothing.
                if cut < bytes.len() - 1024 {
                    assert!(verified.is_err(), "a stream cut at {cut} verified");
                }
            }
        }
    }
    assert!(by_unpack > 0, "no cut was caught while unpacking");
}

/// Offsets of the entry headers of a ustar stream.
fn entry_starts(archive: &[u8]) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut at = 0;
    while at + 512 <= archive.len() && archive[at] != 0 {
        starts.push(at);
        let header = tar::Header::from_byte_slice(&archive[at..at + 512]);
        let size = header.entry_size().unwrap() as usize;
        at += 512 + size.div_ceil(512) * 512;
    }
    starts
}
