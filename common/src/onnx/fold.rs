//! BatchNorm in inference form: the per-channel affine map it computes from its running
//! statistics, and that map folded into the convolution before it. Computed in f64 and
//! rounded once to f32, so folding adds no error beyond that rounding.

use super::OnnxError;
use crate::model::{ModelState, Tensor};

/// BatchNorm's epsilon, PyTorch's default (what training used).
pub(super) const BN_EPS: f64 = 1e-5;

/// `y = scale * x + shift` per channel: `scale = g / sqrt(var + eps)`,
/// `shift = beta - mean * scale`.
pub(super) struct Affine {
    pub scale: Vec<f64>,
    pub shift: Vec<f64>,
}

/// The affine map of BatchNorm node `bn`, from its four tensors in `state` (checked already).
pub(super) fn batch_norm_affine(bn: &str, state: &ModelState) -> Result<Affine, OnnxError> {
    let get = |tensor: &str| -> Result<&[f32], OnnxError> {
        let name = format!("{bn}.{tensor}");
        state
            .get(&name)
            .map(Tensor::data)
            .ok_or(OnnxError::MissingTensor { name })
    };
    let (gamma, beta, mean, var) = (
        get("weight")?,
        get("bias")?,
        get("running_mean")?,
        get("running_var")?,
    );
    let mut scale = Vec::with_capacity(var.len());
    let mut shift = Vec::with_capacity(var.len());
    for c in 0..var.len() {
        let v = f64::from(var[c]) + BN_EPS;
        if v <= 0.0 {
            return Err(OnnxError::NegativeVariance {
                name: format!("{bn}.running_var"),
                channel: c,
                value: var[c],
            });
        }
        let s = f64::from(gamma[c]) / v.sqrt();
        scale.push(s);
        shift.push(f64::from(beta[c]) - f64::from(mean[c]) * s);
    }
    Ok(Affine { scale, shift })
}

/// `weight` (`[out, in, k, k]`) and `bias` (`[out]`, zero when absent) with `affine` applied to
/// their output: `W' = W * scale`, `b' = b * scale + shift`. `names` (weight, bias) and `bn`
/// name the tensors in errors.
pub(super) fn fold_into_conv(
    weight: &Tensor,
    bias: Option<&Tensor>,
    affine: &Affine,
    names: (&str, &str),
    bn: &str,
) -> Result<(Tensor, Tensor), OnnxError> {
    let out = affine.scale.len();
    let per_out = weight.numel() / out.max(1);
    let folded_w: Vec<f32> = weight
        .data()
        .chunks(per_out.max(1))
        .zip(&affine.scale)
        .flat_map(|(row, &s)| row.iter().map(move |&w| (f64::from(w) * s) as f32))
        .collect();
    let folded_b: Vec<f32> = (0..out)
        .map(|o| {
            let b = bias.map_or(0.0, |t| f64::from(t.data()[o]));
            (b * affine.scale[o] + affine.shift[o]) as f32
        })
        .collect();
    for (values, name) in [(&folded_w, names.0), (&folded_b, names.1)] {
        if values.iter().any(|v| !v.is_finite()) {
            return Err(OnnxError::FoldOverflow {
                bn: bn.to_string(),
                tensor: name.to_string(),
            });
        }
    }
    let overflow = |_| OnnxError::Unsupported(format!("shape of {} is inconsistent", names.0));
    Ok((
        Tensor::new(weight.shape().to_vec(), folded_w).map_err(overflow)?,
        Tensor::new(vec![out], folded_b).map_err(overflow)?,
    ))
}
