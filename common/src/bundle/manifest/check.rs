//! The checks a reader runs on a signed manifest before trusting it with paths and shapes:
//! the format, file names that stay in the folder, the roles present, engines matching their
//! files and sources, and input and classes agreeing with the architecture.

use std::collections::BTreeSet;

use super::{BundleManifest, Dim, FileRole};
use crate::arch::OUTPUT_STRIDE;
use crate::bundle::files::is_valid_file_name;
use crate::bundle::{FORMAT, MANIFEST_FILE, SIGNATURE_FILE};

impl BundleManifest {
    /// Checks everything a reader relies on besides the signature: the format, file names that
    /// stay in the folder, one FP32 ONNX and one weights file, engines matching their files
    /// and sources, hashes of the right length, and input and classes agreeing with the
    /// architecture. Every problem is listed.
    pub fn check(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if self.format != FORMAT {
            problems.push(format!("format '{}' is not '{FORMAT}'", self.format));
        }
        if !is_hex64(&self.model_hash) {
            problems.push("model_hash is not 64 hex digits".to_string());
        }
        if let Err(e) = self.architecture.validate() {
            problems.push(e.to_string());
        }
        self.check_files(&mut problems);
        self.check_engines(&mut problems);
        self.check_io(&mut problems);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }

    fn check_files(&self, problems: &mut Vec<String>) {
        let mut names = BTreeSet::new();
        for f in &self.files {
            if !is_valid_file_name(&f.name) || f.name == MANIFEST_FILE || f.name == SIGNATURE_FILE {
                problems.push(format!("file name '{}' is not allowed", f.name));
            }
            if !names.insert(f.name.as_str()) {
                problems.push(format!("file '{}' is listed twice", f.name));
            }
            if !is_hex64(&f.sha256) {
                problems.push(format!("file '{}': sha256 is not 64 hex digits", f.name));
            }
        }
        let count = |role| self.files.iter().filter(|f| f.role == role).count();
        for (role, min, max) in [
            (FileRole::OnnxFp32, 1, 1),
            (FileRole::WeightsSafetensors, 1, 1),
            (FileRole::OnnxInt8Qdq, 0, 1),
        ] {
            let n = count(role);
            if n < min || n > max {
                problems.push(format!(
                    "{n} files with role {}, expected {min} to {max}",
                    role.as_str()
                ));
            }
        }
    }

    fn check_engines(&self, problems: &mut Vec<String>) {
        let mut seen = BTreeSet::new();
        for e in &self.engines {
            match self.file(&e.file) {
                Some(f) if f.role == FileRole::Engine => {}
                _ => problems.push(format!(
                    "engine '{}' is not a file with role engine",
                    e.file
                )),
            }
            match self.file(&e.source) {
                Some(f) if f.role == e.precision.source_role() => {}
                _ => problems.push(format!(
                    "engine '{}': source '{}' is not the ONNX file a {} engine is built from",
                    e.file, e.source, e.precision
                )),
            }
            if let Err(why) = e.target.validate() {
                problems.push(format!("engine '{}': {why}", e.file));
            }
            if e.tensorrt_version != e.target.tensorrt_version {
                problems.push(format!(
                    "engine '{}': built by TensorRT {} but its target says {}",
                    e.file, e.tensorrt_version, e.target.tensorrt_version
                ));
            }
            if !seen.insert((e.target.clone(), e.precision)) {
                problems.push(format!("two {} engines for {}", e.precision, e.target));
            }
        }
        let engine_files = self.files.iter().filter(|f| f.role == FileRole::Engine);
        for f in engine_files {
            if !self.engines.iter().any(|e| e.file == f.name) {
                problems.push(format!(
                    "file '{}' has role engine but no engine entry",
                    f.name
                ));
            }
        }
    }

    fn check_io(&self, problems: &mut Vec<String>) {
        let arch = &self.architecture;
        let expected_input = vec![
            Dim::Symbolic("batch".into()),
            Dim::Fixed(u64::from(arch.in_channels)),
            Dim::Fixed(u64::from(arch.input_size)),
            Dim::Fixed(u64::from(arch.input_size)),
        ];
        if self.input.shape != expected_input {
            problems.push(format!(
                "input shape {:?} does not match the architecture's {:?}",
                self.input.shape, expected_input
            ));
        }
        if self.input.max_batch == 0 {
            problems.push("input max_batch is 0".to_string());
        }
        if self.class_names.len() != arch.num_classes as usize {
            problems.push(format!(
                "{} class names for {} classes",
                self.class_names.len(),
                arch.num_classes
            ));
        }
        if self.preprocessing.channels.len() != arch.in_channels as usize
            || self.preprocessing.mean.len() != arch.in_channels as usize
            || self.preprocessing.std.len() != arch.in_channels as usize
        {
            problems.push(
                "preprocessing channels, mean and std need one entry per input channel".into(),
            );
        }
        if self.postprocessing.output_stride != OUTPUT_STRIDE {
            problems.push(format!(
                "output stride {} is not the detector's {OUTPUT_STRIDE}",
                self.postprocessing.output_stride
            ));
        }
    }
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
