//! Tests of the architecture description: the golden parameter list of the default config
//! (the wire contract), validation, and cost.

use std::path::Path;

use super::*;

const GOLDEN: &str = include_str!("default_params.golden");

/// One line per tensor in ModelState (name) order: `name [d0, d1, ...] param|buffer`.
fn param_listing(graph: &Graph) -> String {
    let mut params = graph.params();
    params.sort_by(|a, b| a.name.cmp(&b.name));
    params
        .iter()
        .map(|p| {
            let kind = if p.trainable { "param" } else { "buffer" };
            format!("{} {:?} {kind}\n", p.name, p.shape)
        })
        .collect()
}

#[test]
fn default_params_match_golden() {
    let listing = param_listing(&ArchConfig::default().graph().unwrap());
    if std::env::var_os("FEDINSPECT_BLESS").is_some() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/arch/default_params.golden");
        std::fs::write(path, &listing).unwrap();
    }
    assert_eq!(
        listing, GOLDEN,
        "parameter names or shapes of the default architecture changed: this breaks every \
         stored model; if deliberate, rerun with FEDINSPECT_BLESS=1 and review the diff"
    );
}

#[test]
fn default_size_and_cost_are_pinned() {
    let g = ArchConfig::default().graph().unwrap();
    assert_eq!(g.num_trainable(), 862_026);
    assert_eq!(g.num_values(), 863_978);
    assert_eq!(g.params().len(), 89);
    // 0.82 GMAC per 320x320 training crop; the PyTorch baseline is about 1.0 GMAC.
    assert_eq!(g.macs(320, 320), 816_908_800);
    assert_eq!(g.macs(640, 640), 4 * 816_908_800 + attention_growth());
}

/// The attention's matrix products grow with the square of the positions: at 640 there are
/// 4x the positions of 320, so 16x rather than 4x the MACs of its two products.
fn attention_growth() -> u64 {
    let (p, d, c) = (100u64, 32u64, 128u64);
    12 * (p * d * p + c * p * p)
}

#[test]
fn widths_and_depths_scale() {
    let small = ArchConfig {
        width: 0.25,
        depth: 2.0,
        ..ArchConfig::default()
    };
    assert_eq!(small.stage_widths(), [8, 8, 16, 24, 32]);
    assert_eq!(small.stage_depths(), [2, 2, 2, 2]);
    let g = small.graph().unwrap();
    assert!(g.node("backbone.s3.b1.cv2.conv").is_some());
    assert!(g.num_trainable() < ArchConfig::default().graph().unwrap().num_trainable() / 4);
}

#[test]
fn attention_can_be_left_out() {
    let cfg = ArchConfig {
        attention: false,
        ..ArchConfig::default()
    };
    let g = cfg.graph().unwrap();
    assert!(g.nodes.iter().all(|n| !n.name.starts_with("backbone.attn")));
    assert!(g.nodes.iter().all(|n| n.op != Op::MatMul));
}

#[test]
fn config_reports_every_problem() {
    let bad = ArchConfig {
        in_channels: 4,
        num_classes: 0,
        input_size: 100,
        width: f64::NAN,
        depth: 0.0,
        attention: true,
        fpn_width: 0,
        head_width: 4096,
    };
    match bad.validate() {
        Err(ArchError::Config(problems)) => assert_eq!(problems.len(), 7, "{problems:?}"),
        other => panic!("expected config errors, got {other:?}"),
    }
}

#[test]
fn config_round_trips_through_json_and_refuses_unknown_fields() {
    let cfg = ArchConfig::default();
    let json = serde_json::to_string(&cfg).unwrap();
    assert_eq!(serde_json::from_str::<ArchConfig>(&json).unwrap(), cfg);
    let extra = json.replace("\"attention\"", "\"attn\":true,\"attention\"");
    assert!(serde_json::from_str::<ArchConfig>(&extra).is_err());
}

#[test]
fn graph_round_trips_through_json() {
    let g = ArchConfig::default().graph().unwrap();
    let json = serde_json::to_string(&g).unwrap();
    assert!(
        json.contains(r#""name":"head.heatmap","op":"conv""#),
        "{}",
        &json[..200]
    );
    assert_eq!(serde_json::from_str::<Graph>(&json).unwrap(), g);
}

#[test]
fn graph_validation_finds_broken_graphs() {
    let problems = |g: &Graph| match g.validate() {
        Err(ArchError::Graph(problems)) => problems.join("\n"),
        other => panic!("expected graph errors, got {other:?}"),
    };
    let mut g = ArchConfig::default().graph().unwrap();
    g.nodes[1].inputs = vec!["head.box".into()];
    g.nodes.push(g.nodes[2].clone());
    let text = problems(&g);
    assert!(
        text.contains("reads 'head.box', which is not an earlier node"),
        "{text}"
    );
    assert!(text.contains("'backbone.stem.bn' appears twice"), "{text}");

    let mut g = ArchConfig::default().graph().unwrap();
    let add = g.nodes.iter().position(|n| n.op == Op::Add).unwrap();
    g.nodes[add].inputs[0] = INPUT.into();
    assert!(problems(&g).contains("adds Map { c: 2, stride: 1 }"));

    let mut g = ArchConfig::default().graph().unwrap();
    g.nodes[2].channels = 7;
    g.outputs.push("nowhere".into());
    let text = problems(&g);
    assert!(
        text.contains("'backbone.stem.bn' declares 7 channels but computes 16"),
        "{text}"
    );
    assert!(text.contains("output 'nowhere' is not a node"), "{text}");
}

#[test]
fn heatmap_bias_starts_at_prior_and_attention_at_identity() {
    let g = ArchConfig::default().graph().unwrap();
    let params = g.params();
    let find = |n: &str| params.iter().find(|p| p.name == n).unwrap();
    assert_eq!(find("head.heatmap.bias").init, ParamInit::Const(-2.19));
    assert_eq!(
        find("backbone.attn.proj.weight").init,
        ParamInit::Const(0.0)
    );
    assert_eq!(
        find("backbone.stem.conv.weight").init,
        ParamInit::Uniform {
            bound: 1.0 / 18f32.sqrt()
        }
    );
    assert!(!find("neck.lateral1.weight").name.is_empty());
}
