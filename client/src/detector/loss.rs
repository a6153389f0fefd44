//! CenterNet losses: penalty-reduced focal loss on the class heatmap and masked L1 on the box
//! regression at object centres, both normalised by the number of objects, written exactly
//! as the PyTorch baseline computes them so the two train alike.

use tch::{Kind, TchError, Tensor};

use super::targets::Targets;
use super::HeadOutput;

/// Weight of the box loss in the total; the baseline's 0.1.
pub const DEFAULT_BOX_WEIGHT: f64 = 0.1;

/// The total loss (to back-propagate) and its two parts (detached, for reporting).
pub struct LossParts {
    pub total: Tensor,
    pub heatmap: Tensor,
    pub boxes: Tensor,
}

/// `focal(heatmap) + box_weight * l1(boxes)`, computed in float32 whatever the head's dtype.
pub fn centernet_loss(
    out: &HeadOutput,
    targets: &Targets,
    box_weight: f64,
) -> Result<LossParts, TchError> {
    let heatmap = focal_loss(&out.heatmap.f_to_kind(Kind::Float)?, &targets.heatmap)?;
    let boxes = masked_l1(
        &out.boxes.f_to_kind(Kind::Float)?,
        &targets.boxes,
        &targets.mask,
    )?;
    let total = heatmap.f_add(&boxes.f_mul_scalar(box_weight)?)?;
    Ok(LossParts {
        total,
        heatmap: heatmap.f_detach()?,
        boxes: boxes.f_detach()?,
    })
}

/// Focal loss with alpha 2, beta 4 (CenterNet), over logits; the sum over positives and
/// negatives divided by the number of cells whose target is exactly 1 (at least 1).
pub fn focal_loss(logits: &Tensor, gt: &Tensor) -> Result<Tensor, TchError> {
    let p = logits.f_sigmoid()?.f_clamp(1e-4, 1.0 - 1e-4)?;
    let pos = gt.f_eq(1.0)?.f_to_kind(Kind::Float)?;
    let neg = pos.f_neg()?.f_add_scalar(1.0)?;
    let one_minus_p = p.f_neg()?.f_add_scalar(1.0)?;
    let pos_loss = p.f_log()?.f_mul(&one_minus_p.f_square()?)?.f_mul(&pos)?;
    let neg_weight = gt.f_neg()?.f_add_scalar(1.0)?.f_pow_tensor_scalar(4)?;
    let neg_loss = one_minus_p
        .f_log()?
        .f_mul(&p.f_square()?)?
        .f_mul(&neg_weight)?
        .f_mul(&neg)?;
    let n = pos.f_sum(Kind::Float)?.f_clamp_min(1.0)?;
    pos_loss
        .f_sum(Kind::Float)?
        .f_add(&neg_loss.f_sum(Kind::Float)?)?
        .f_neg()?
        .f_div(&n)
}

/// `sum |pred - gt|` over the masked cells and all 4 channels, divided by the number of
/// masked cells (at least 1).
pub fn masked_l1(pred: &Tensor, gt: &Tensor, mask: &Tensor) -> Result<Tensor, TchError> {
    let diff = pred.f_mul(mask)?.f_sub(&gt.f_mul(mask)?)?.f_abs()?;
    diff.f_sum(Kind::Float)?
        .f_div(&mask.f_sum(Kind::Float)?.f_clamp_min(1.0)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn focal_loss_matches_hand_computation() {
        // One positive cell with p = 0.5 and one negative with gt 0.5, p = 0.5.
        let logits = Tensor::from_slice(&[0f32, 0.0]).view([1, 1, 1, 2]);
        let gt = Tensor::from_slice(&[1f32, 0.5]).view([1, 1, 1, 2]);
        let got = focal_loss(&logits, &gt).unwrap().double_value(&[]);
        let pos = 0.5f64.ln() * 0.25;
        let neg = 0.5f64.ln() * 0.25 * 0.5f64.powi(4);
        assert!((got + pos + neg).abs() < 1e-6, "{got}");
    }

    #[test]
    fn l1_counts_only_masked_cells() {
        let pred = Tensor::from_slice(&[1f32, 5.0, 2.0, 7.0]).view([1, 2, 1, 2]);
        let gt = Tensor::from_slice(&[0f32, 0.0, 0.0, 0.0]).view([1, 2, 1, 2]);
        let mask = Tensor::from_slice(&[1f32, 0.0]).view([1, 1, 1, 2]);
        let got = masked_l1(&pred, &gt, &mask).unwrap().double_value(&[]);
        assert_eq!(got, 3.0);
    }
}
