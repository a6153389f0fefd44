//! Reading the evaluator's stdout: the last line that is a JSON object, with `map_50` (and
//! `map_33` when present) between 0 and 1. This is the format `client eval --json` prints
//! (`fedinspect_client::eval::EvalReport`, one object on one line); other fields are ignored.

use serde::Deserialize;

/// The scores the gate reads from one evaluation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scores {
    /// mAP at IoU 0.5 on the validation set: what the gate compares.
    pub map_50: f64,
    /// The DeepPCB protocol's mAP (IoU > 0.33), when the evaluator reports it.
    pub map_33: Option<f64>,
}

#[derive(Deserialize)]
struct Printed {
    map_50: Option<serde_json::Value>,
    map_33: Option<serde_json::Value>,
}

/// The scores in `stdout`, or why there are none (worded for an error message).
pub fn parse_scores(stdout: &str) -> Result<Scores, String> {
    let Some(line) = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('{'))
    else {
        return Err(format!(
            "its stdout holds no JSON object (it must print one, as `client eval --json` does); stdout ended with: {}",
            tail(stdout)
        ));
    };
    let printed: Printed = serde_json::from_str(line)
        .map_err(|e| format!("its JSON line is not a JSON object ({e}): {line}"))?;
    let map_50 = printed
        .map_50
        .ok_or_else(|| format!("its JSON object has no map_50: {line}"))
        .and_then(|v| score("map_50", &v))?;
    let map_33 = printed
        .map_33
        .filter(|v| !v.is_null())
        .map(|v| score("map_33", &v))
        .transpose()?;
    Ok(Scores { map_50, map_33 })
}

fn score(name: &str, v: &serde_json::Value) -> Result<f64, String> {
    match v.as_f64() {
        Some(x) if x.is_finite() && (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err(format!("its {name} is {v}, not a number between 0 and 1")),
    }
}

/// The last few hundred characters of `text`, for messages.
pub fn tail(text: &str) -> String {
    const MAX: usize = 600;
    let t = text.trim_end();
    if t.is_empty() {
        return "(nothing)".to_string();
    }
    let start = t.len().saturating_sub(MAX);
    let start = (start..=t.len())
        .find(|&i| t.is_char_boundary(i))
        .unwrap_or(t.len());
    let prefix = if start > 0 { "..." } else { "" };
    format!("{prefix}{}", &t[start..])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The stdout of `client eval --data client/tests/fixtures/data/deeppcb --checkpoint
    /// det.safetensors --json --device cpu` (release build, a 3-step `client train` checkpoint
    /// of the fixture, 2026-11-28), copied verbatim: `serde_json::to_string` of
    /// `fedinspect_client::eval::EvalReport`.
    const CLIENT_EVAL_JSON: &str = r#"{"map_50":0.0,"map_50_95":0.0,"map_33":0.0,"precision_33":0.0,"recall_33":0.0,"f1_33":0.0,"per_class":{"mousebite":0.0,"open":0.0,"pin_hole":0.0,"short":0.0,"spur":0.0,"spurious_copper":0.0},"images":1,"seconds":0.008792022,"score_threshold":0.3}"#;

    #[test]
    fn reads_the_line_client_eval_json_prints() {
        let s = parse_scores(&format!("{CLIENT_EVAL_JSON}\n")).unwrap();
        assert_eq!(
            s,
            Scores {
                map_50: 0.0,
                map_33: Some(0.0)
            }
        );
        // The same fields with scores a trained model has, after lines a wrapper printed.
        let trained = CLIENT_EVAL_JSON
            .replacen("\"map_50\":0.0", "\"map_50\":0.9683410925", 1)
            .replacen("\"map_33\":0.0", "\"map_33\":0.9751026", 1);
        let s = parse_scores(&format!("loading model\n{trained}\n")).unwrap();
        assert_eq!(s.map_50, 0.9683410925);
        assert_eq!(s.map_33, Some(0.9751026));
    }

    #[test]
    fn map_33_is_optional_and_the_last_object_counts() {
        let s = parse_scores("{\"map_50\": 0.1}\n{\"map_50\": 0.5, \"other\": 1}\n").unwrap();
        assert_eq!(
            s,
            Scores {
                map_50: 0.5,
                map_33: None
            }
        );
    }

    #[test]
    fn refuses_output_without_a_usable_map_50() {
        let e = parse_scores("mAP@0.5 0.97\n").unwrap_err();
        assert!(
            e.contains("no JSON object") && e.contains("mAP@0.5 0.97"),
            "{e}"
        );
        let e = parse_scores("{\"map_33\": 0.9}").unwrap_err();
        assert!(e.contains("no map_50"), "{e}");
        let e = parse_scores("{\"map_50\": \"high\"}").unwrap_err();
        assert!(e.contains("not a number between 0 and 1"), "{e}");
        let e = parse_scores("{\"map_50\": 1.5}").unwrap_err();
        assert!(e.contains("1.5"), "{e}");
        let e = parse_scores("{\"map_50\": 0.9").unwrap_err();
        assert!(e.contains("not a JSON object"), "{e}");
    }

    #[test]
    fn tail_keeps_the_end() {
        let long = format!("{}END", "x".repeat(2000));
        let t = tail(&long);
        assert!(t.starts_with("...") && t.ends_with("END") && t.len() < 700);
        assert_eq!(tail(" \n"), "(nothing)");
    }
}
