//! [`Evaluation`]: one version's scores on the validation set, kept in sled (tree
//! `evaluations`) so that a version is evaluated once per evaluator command.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub version: u64,
    /// mAP at IoU 0.5 on the validation set.
    pub map_50: f64,
    /// The DeepPCB protocol's mAP (IoU > 0.33), when the evaluator printed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub map_33: Option<f64>,
    /// The `eval_command` that produced it; under another command it is evaluated again.
    pub command: Vec<String>,
    pub evaluated_unix_ms: i64,
    /// Wall time of the evaluator.
    pub seconds: f64,
}
