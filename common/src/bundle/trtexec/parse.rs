//! Reading trtexec's output: the TensorRT version of its banner (or a `TensorRT version:`
//! line) and the compute capability of its device report.

/// The dotted TensorRT version in trtexec output: the banner `[TensorRT v100300]` (TensorRT
/// 10 and later: major * 10000 + minor * 100 + patch; before: major * 1000 + minor * 100 +
/// patch), or a `TensorRT version: 10.3.0` line.
pub fn parse_tensorrt_version(text: &str) -> Option<String> {
    if let Some(at) = text.find("[TensorRT v") {
        let digits: String = text[at + "[TensorRT v".len()..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        if let Some(v) = dotted_tensorrt_version(&digits) {
            return Some(v);
        }
    }
    let at = text.find("TensorRT version: ")?;
    let v: String = text[at + "TensorRT version: ".len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    dotted_tensorrt_version(v.trim_end_matches('.'))
}

/// `100300` → `10.3.0`, `8601` → `8.6.1`; a dotted version is returned as is. This is how the
/// banner number plants report as their capability becomes an [`EngineTarget`] version.
pub fn dotted_tensorrt_version(raw: &str) -> Option<String> {
    if raw.contains('.') {
        let ok = raw
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
        return ok.then(|| raw.to_string());
    }
    if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_digit()) || raw.len() > 8 {
        return None;
    }
    let n: u64 = raw.parse().ok()?;
    let (major, minor, patch) = if n >= 100_000 {
        (n / 10_000, n / 100 % 100, n % 100)
    } else if n >= 1_000 {
        (n / 1_000, n / 100 % 10, n % 100)
    } else {
        return None;
    };
    Some(format!("{major}.{minor}.{patch}"))
}

/// The `Compute Capability: 8.6` of trtexec's device report, if it printed one.
pub fn parse_compute_capability(text: &str) -> Option<String> {
    let at = text.find("Compute Capability: ")?;
    let v: String = text[at + "Compute Capability: ".len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    (v.split('.').count() == 2 && !v.ends_with('.')).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensorrt_versions_from_banners_and_reports() {
        assert_eq!(dotted_tensorrt_version("100300").as_deref(), Some("10.3.0"));
        assert_eq!(
            dotted_tensorrt_version("101100").as_deref(),
            Some("10.11.0")
        );
        assert_eq!(dotted_tensorrt_version("8601").as_deref(), Some("8.6.1"));
        assert_eq!(dotted_tensorrt_version("10.3.0").as_deref(), Some("10.3.0"));
        assert_eq!(dotted_tensorrt_version("12"), None);
        assert_eq!(dotted_tensorrt_version("x"), None);
        assert_eq!(dotted_tensorrt_version("10..3"), None);
        let banner = "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] [b40] # trtexec --help";
        assert_eq!(parse_tensorrt_version(banner).as_deref(), Some("10.3.0"));
        let line = "[08/01/2025-10:00:00] [I] TensorRT version: 8.6.1\n";
        assert_eq!(parse_tensorrt_version(line).as_deref(), Some("8.6.1"));
        assert_eq!(parse_tensorrt_version("usage: trtexec"), None);
    }

    #[test]
    fn compute_capability_from_the_device_report() {
        let log = "[I] Selected Device: NVIDIA A2\n[I] Compute Capability: 8.6\n";
        assert_eq!(parse_compute_capability(log).as_deref(), Some("8.6"));
        assert_eq!(parse_compute_capability("no device"), None);
    }
}
