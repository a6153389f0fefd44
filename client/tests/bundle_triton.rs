//! Laying an installed bundle out as a Triton model repository version: the generated
//! config.pbtxt is parsed (protobuf text format, by the small parser below) and checked field
//! by field for ONNX and TensorRT layouts; the model file is the bundle's; re-laying the same
//! version is a no-op, a different file under an existing version is refused.

mod bundle_support;

use std::collections::BTreeMap;
use std::fs;

use bundle_support::*;
use fedinspect_client::bundle::{
    layout_triton, BundleInstaller, InstallOptions, TritonError, TritonFormat, TritonRequest,
};
use fedinspect_common::bundle::{EnginePrecision, ONNX_FP32_FILE, ONNX_INT8_QDQ_FILE};
use fedinspect_common::signing::SigningKey;

#[test]
fn onnx_layout_with_a_parsed_config() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let built = build_onnx_only(dir.path(), &key, 7);
    let plant = BundleInstaller::open(&dir.path().join("state"), key.verifying_key()).unwrap();
    plant
        .install_archive(&built.archive[..], &InstallOptions::default())
        .unwrap();
    let installed = plant.current().unwrap().unwrap();
    let repo = dir.path().join("repo");
    let req = TritonRequest {
        repo: &repo,
        model_name: None,
        version: None,
        target: None,
        format: TritonFormat::Auto,
    };
    let layout = layout_triton(&installed, &req).unwrap();
    assert_eq!(layout.platform, "onnxruntime_onnx");
    assert!(!layout.unchanged);
    assert_eq!(
        layout.model_file,
        repo.join("fedinspect_detector/7/model.onnx")
    );
    assert_eq!(
        fs::read(&layout.model_file).unwrap(),
        fs::read(built.dir.join(ONNX_FP32_FILE)).unwrap()
    );
    let names: Vec<_> = fs::read_dir(repo.join("fedinspect_detector"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "version folder and config only: {names:?}");

    let config = parse(&fs::read_to_string(&layout.config).unwrap());
    assert_eq!(config.scalar("name"), "fedinspect_detector");
    assert_eq!(config.scalar("platform"), "onnxruntime_onnx");
    assert_eq!(config.scalar("max_batch_size"), "8");
    let inputs = config.all("input");
    assert_eq!(inputs.len(), 1);
    assert_eq!(inputs[0].scalar("name"), "images");
    assert_eq!(inputs[0].scalar("data_type"), "TYPE_FP32");
    assert_eq!(inputs[0].list("dims"), ["2", "64", "64"]);
    let outputs = config.all("output");
    let out: BTreeMap<_, _> = outputs
        .iter()
        .map(|o| (o.scalar("name"), o.list("dims")))
        .collect();
    assert_eq!(out["heatmap"], ["6", "16", "16"]);
    assert_eq!(out["boxes"], ["4", "16", "16"]);
    assert!(config.get("dynamic_batching").is_some());
    let policy = config
        .get("version_policy")
        .unwrap()
        .msg()
        .get("latest")
        .unwrap()
        .msg();
    assert_eq!(policy.scalar("num_versions"), "1");

    // The same layout again is a no-op; the INT8 ONNX under the same version is refused.
    assert!(layout_triton(&installed, &req).unwrap().unchanged);
    let int8 = TritonRequest {
        format: TritonFormat::OnnxInt8,
        ..req.clone()
    };
    let err = layout_triton(&installed, &int8).unwrap_err();
    assert!(
        matches!(err, TritonError::VersionExists { version: 7, .. }),
        "{err}"
    );
    // ... and lands as a new version.
    let v8 = TritonRequest {
        version: Some(8),
        ..int8
    };
    let l8 = layout_triton(&installed, &v8).unwrap();
    assert_eq!(
        fs::read(&l8.model_file).unwrap(),
        fs::read(built.dir.join(ONNX_INT8_QDQ_FILE)).unwrap()
    );

    // No engine without a GPU target; a bad model name is refused.
    let plan = TritonRequest {
        format: TritonFormat::Plan(EnginePrecision::Fp16),
        version: Some(9),
        ..req.clone()
    };
    assert!(matches!(
        layout_triton(&installed, &plan),
        Err(TritonError::NoSuchFile { .. })
    ));
    let bad = TritonRequest {
        model_name: Some("../x"),
        ..req
    };
    assert!(matches!(
        layout_triton(&installed, &bad),
        Err(TritonError::ModelName(_))
    ));
}

#[test]
fn tensorrt_layout_uses_the_engine_for_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate().unwrap();
    let built = build_with_engines(dir.path(), &key, 3);
    let plant = BundleInstaller::open(&dir.path().join("state"), key.verifying_key()).unwrap();
    plant
        .install_archive(&built.archive[..], &InstallOptions::default())
        .unwrap();
    let installed = plant.current().unwrap().unwrap();
    let repo = dir.path().join("repo");
    let target = sm86();
    let req = TritonRequest {
        repo: &repo,
        model_name: Some("pcb_line_4"),
        version: None,
        target: Some(&target),
        format: TritonFormat::Auto,
    };
    let layout = layout_triton(&installed, &req).unwrap();
    assert_eq!(layout.platform, "tensorrt_plan");
    assert_eq!(layout.model_file, repo.join("pcb_line_4/3/model.plan"));
    let plan = fs::read_to_string(&layout.model_file).unwrap();
    assert!(plan.contains("precision=fp16"), "{plan}");
    let config = parse(&fs::read_to_string(&layout.config).unwrap());
    assert_eq!(config.scalar("name"), "pcb_line_4");
    assert_eq!(config.scalar("platform"), "tensorrt_plan");
    assert_eq!(config.scalar("max_batch_size"), "8");

    // Another GPU has no engine: Auto falls back to ONNX, an explicit plan is refused.
    let other = fedinspect_common::bundle::EngineTarget {
        compute_capability: "9.0".into(),
        tensorrt_version: "10.3.0".into(),
    };
    let auto = TritonRequest {
        target: Some(&other),
        version: Some(4),
        ..req.clone()
    };
    assert_eq!(
        layout_triton(&installed, &auto).unwrap().platform,
        "onnxruntime_onnx"
    );
    let int8 = TritonRequest {
        target: Some(&other),
        version: Some(5),
        format: TritonFormat::Plan(EnginePrecision::Int8),
        ..req
    };
    let err = layout_triton(&installed, &int8).unwrap_err();
    assert!(
        err.to_string()
            .contains("int8 engine for compute capability 9.0"),
        "{err}"
    );
}

// --- A parser for the part of protobuf text format config.pbtxt uses. ---

#[derive(Clone, Debug)]
enum Value {
    Scalar(String),
    Msg(Msg),
    List(Vec<Value>),
}

#[derive(Clone, Debug, Default)]
struct Msg(Vec<(String, Value)>);

impl Value {
    fn msg(&self) -> &Msg {
        match self {
            Value::Msg(m) => m,
            other => panic!("not a message: {other:?}"),
        }
    }
}

impl Msg {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    fn scalar(&self, key: &str) -> String {
        match self.get(key) {
            Some(Value::Scalar(s)) => s.clone(),
            other => panic!("{key}: not a scalar: {other:?}"),
        }
    }
    fn list(&self, key: &str) -> Vec<String> {
        match self.get(key) {
            Some(Value::List(items)) => items
                .iter()
                .map(|v| match v {
                    Value::Scalar(s) => s.clone(),
                    other => panic!("{key}: not a scalar list: {other:?}"),
                })
                .collect(),
            other => panic!("{key}: not a list: {other:?}"),
        }
    }
    /// The messages of a repeated field, written as a list of messages or repeated keys.
    fn all(&self, key: &str) -> Vec<Msg> {
        let mut out = Vec::new();
        for (k, v) in &self.0 {
            if k != key {
                continue;
            }
            match v {
                Value::Msg(m) => out.push(m.clone()),
                Value::List(items) => out.extend(items.iter().map(|i| i.msg().clone())),
                Value::Scalar(_) => panic!("{key}: scalar"),
            }
        }
        out
    }
}

fn tokens(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            '#' => {
                while chars.peek().is_some_and(|&c| c != '\n') {
                    chars.next();
                }
            }
            c if c.is_whitespace() => {
                chars.next();
            }
            '{' | '}' | '[' | ']' | ':' | ',' => {
                out.push(c.to_string());
                chars.next();
            }
            '"' => {
                chars.next();
                let mut s = String::from("\"");
                for c in chars.by_ref() {
                    if c == '"' {
                        break;
                    }
                    s.push(c);
                }
                out.push(s);
            }
            _ => {
                let mut s = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_alphanumeric() || c == '_' || c == '-' || c == '.' {
                        s.push(c);
                        chars.next();
                    } else {
                        break;
                    }
                }
                assert!(!s.is_empty(), "unexpected character {c:?}");
                out.push(s);
            }
        }
    }
    out
}

fn parse(text: &str) -> Msg {
    let toks = tokens(text);
    let mut pos = 0;
    let msg = parse_msg(&toks, &mut pos, None);
    assert_eq!(pos, toks.len(), "trailing tokens");
    msg
}

fn parse_msg(toks: &[String], pos: &mut usize, close: Option<&str>) -> Msg {
    let mut fields = Vec::new();
    while *pos < toks.len() && Some(toks[*pos].as_str()) != close {
        let key = toks[*pos].clone();
        assert!(
            key.chars().all(|c| c.is_alphanumeric() || c == '_'),
            "bad key {key}"
        );
        *pos += 1;
        if toks[*pos] == ":" {
            *pos += 1;
        }
        let value = parse_value(toks, pos);
        fields.push((key, value));
    }
    if let Some(c) = close {
        assert_eq!(toks[*pos], c);
        *pos += 1;
    }
    Msg(fields)
}

fn parse_value(toks: &[String], pos: &mut usize) -> Value {
    let t = toks[*pos].clone();
    *pos += 1;
    match t.as_str() {
        "{" => Value::Msg(parse_msg(toks, pos, Some("}"))),
        "[" => {
            let mut items = Vec::new();
            while toks[*pos] != "]" {
                items.push(parse_value(toks, pos));
                if toks[*pos] == "," {
                    *pos += 1;
                }
            }
            *pos += 1;
            Value::List(items)
        }
        s if s.starts_with('"') => Value::Scalar(s[1..].to_string()),
        s => Value::Scalar(s.to_string()),
    }
}
