//! A model file written by `ModelState::save_safetensors` opens as is in Python's
//! `safetensors` (the reference implementation) with the same names, shapes, values and
//! metadata. Uses the interpreter of the LibTorch cache (`FEDINSPECT_PYTHON`, set by
//! scripts/env.sh, which installs `safetensors` next to torch).

use std::collections::BTreeMap;
use std::process::Command;

use fedinspect_common::{ModelState, Tensor};

#[test]
fn python_safetensors_reads_our_model_files() {
    let Ok(python) = std::env::var("FEDINSPECT_PYTHON") else {
        eprintln!(
            "SKIPPED python_safetensors_reads_our_model_files: FEDINSPECT_PYTHON is not set; \
             run the tests through scripts/test.sh, which sets it"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.safetensors");
    let mut m = ModelState::new();
    m.insert(
        "backbone.stem.conv.weight",
        Tensor::new(
            vec![2, 1, 2, 2],
            (0..8).map(|i| i as f32 * 0.25 - 1.0).collect(),
        )
        .unwrap(),
    )
    .unwrap();
    m.insert(
        "head.heatmap.bias",
        Tensor::new(vec![3], vec![-2.19, 0.5, 1e-30]).unwrap(),
    )
    .unwrap();
    let mut meta = BTreeMap::new();
    meta.insert("round".to_string(), "7".to_string());
    m.save_safetensors(&path, &meta).unwrap();

    let script = r#"
import sys
from safetensors import safe_open
with safe_open(sys.argv[1], framework="numpy") as f:
    print(f.metadata()["round"])
    for k in sorted(f.keys()):
        t = f.get_tensor(k)
        print(k, str(t.dtype), list(t.shape), " ".join(repr(float(v)) for v in t.reshape(-1)))
"#;
    let out = Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(&path)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("7"));
    for (name, t) in m.iter() {
        let line = lines.next().expect("one line per tensor");
        let mut parts = line.splitn(3, ' ');
        assert_eq!(parts.next(), Some(name));
        assert_eq!(parts.next(), Some("float32"));
        let rest = parts.next().unwrap();
        let (shape, values) = rest.split_once("] ").unwrap();
        let shape: Vec<usize> = shape
            .trim_start_matches('[')
            .split(", ")
            .map(|d| d.parse().unwrap())
            .collect();
        assert_eq!(shape, t.shape());
        let values: Vec<f32> = values
            .split(' ')
            .map(|v| v.parse::<f64>().unwrap() as f32)
            .collect();
        assert_eq!(values, t.data(), "values of {name}");
    }
}
