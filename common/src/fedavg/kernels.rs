//! The inner loops of aggregation: f64 multiply-add of f32 deltas, the final average, and the
//! finiteness scan, written so that the compiler vectorises them.
//!
//! Every kernel computes, per element, exactly the scalar expression in its doc comment, in the
//! order written: a product is rounded to f64 and then added (Rust never fuses `a * b + c`
//! into one FMA), so vector width, tiling and CPU features never change a bit. On x86_64 the
//! same code is also compiled with AVX2 enabled and picked at run time.

/// Most terms fused into one pass over the accumulator.
pub(crate) const MAX_FUSED: usize = 4;

/// `acc[i] = (((acc[i] + w0*x0[i]) + w1*x1[i]) + ...)` for up to [`MAX_FUSED`] terms, in the
/// order given: the same bits as one pass per term, with fewer passes over `acc`.
pub(crate) fn accumulate(acc: &mut [f64], terms: &[(f64, &[f32])]) {
    for group in terms.chunks(MAX_FUSED) {
        match *group {
            [(w0, x0)] => dispatch_fused::<1>(acc, [w0], [x0]),
            [(w0, x0), (w1, x1)] => dispatch_fused::<2>(acc, [w0, w1], [x0, x1]),
            [(w0, x0), (w1, x1), (w2, x2)] => dispatch_fused::<3>(acc, [w0, w1, w2], [x0, x1, x2]),
            [(w0, x0), (w1, x1), (w2, x2), (w3, x3)] => {
                dispatch_fused::<4>(acc, [w0, w1, w2, w3], [x0, x1, x2, x3])
            }
            _ => unreachable!("chunks of at most MAX_FUSED terms"),
        }
    }
}

/// `out[i] = ((base[i] as f64) + acc[i] / total) as f32`: the FedAvg step, rounded once.
pub(crate) fn average(out: &mut [f32], base: &[f32], acc: &[f64], total: f64) {
    assert!(base.len() == out.len() && acc.len() == out.len());
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, as checked just above.
        unsafe { average_avx2(out, base, acc, total) };
        return;
    }
    average_generic(out, base, acc, total);
}

/// Index of the first NaN or infinity in `x`.
pub(crate) fn first_non_finite(x: &[f32]) -> Option<usize> {
    const EXP: u32 = 0x7f80_0000;
    const BLOCK: usize = 256;
    // A branch-free OR over each block vectorises; only a block that has one is searched.
    x.chunks(BLOCK).enumerate().find_map(|(b, block)| {
        let bad = block
            .iter()
            .fold(false, |acc, v| acc | (v.to_bits() & EXP == EXP));
        bad.then(|| b * BLOCK + block.iter().position(|v| !v.is_finite()).unwrap_or(0))
    })
}

fn dispatch_fused<const N: usize>(acc: &mut [f64], w: [f64; N], xs: [&[f32]; N]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, as checked just above.
        unsafe { fused_avx2::<N>(acc, w, xs) };
        return;
    }
    fused::<N>(acc, w, xs);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fused_avx2<const N: usize>(acc: &mut [f64], w: [f64; N], xs: [&[f32]; N]) {
    fused::<N>(acc, w, xs);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn average_avx2(out: &mut [f32], base: &[f32], acc: &[f64], total: f64) {
    average_generic(out, base, acc, total);
}

/// One pass over `acc` with `N` terms. Written as zipped iterators, which the loop vectoriser
/// turns into contiguous vector loads with no bounds checks.
#[inline(always)]
fn fused<const N: usize>(acc: &mut [f64], w: [f64; N], xs: [&[f32]; N]) {
    for x in xs {
        assert_eq!(x.len(), acc.len(), "every term covers the accumulator tile");
    }
    match (w.as_slice(), xs.as_slice()) {
        (&[w0], &[x0]) => {
            for (a, &v0) in acc.iter_mut().zip(x0) {
                *a += w0 * f64::from(v0);
            }
        }
        (&[w0, w1], &[x0, x1]) => {
            for ((a, &v0), &v1) in acc.iter_mut().zip(x0).zip(x1) {
                *a = (*a + w0 * f64::from(v0)) + w1 * f64::from(v1);
            }
        }
        (&[w0, w1, w2], &[x0, x1, x2]) => {
            for (((a, &v0), &v1), &v2) in acc.iter_mut().zip(x0).zip(x1).zip(x2) {
                *a = ((*a + w0 * f64::from(v0)) + w1 * f64::from(v1)) + w2 * f64::from(v2);
            }
        }
        (&[w0, w1, w2, w3], &[x0, x1, x2, x3]) => {
            for ((((a, &v0), &v1), &v2), &v3) in acc.iter_mut().zip(x0).zip(x1).zip(x2).zip(x3) {
                *a = (((*a + w0 * f64::from(v0)) + w1 * f64::from(v1)) + w2 * f64::from(v2))
                    + w3 * f64::from(v3);
            }
        }
        _ => unreachable!("1 to MAX_FUSED terms"),
    }
}

#[inline(always)]
fn average_generic(out: &mut [f32], base: &[f32], acc: &[f64], total: f64) {
    for ((o, &b), &a) in out.iter_mut().zip(base).zip(acc) {
        *o = (f64::from(b) + a / total) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_passes_equal_one_pass_per_term() {
        let n = 1003; // not a multiple of any vector width
        let xs: Vec<Vec<f32>> = (0..7)
            .map(|k| {
                (0..n)
                    .map(|i| ((i * 7 + k * 13) % 97) as f32 * 0.37 - 11.0)
                    .collect()
            })
            .collect();
        let ws: Vec<f64> = (0..7).map(|k| 1.0 + k as f64 / 3.0).collect();
        let terms: Vec<(f64, &[f32])> = ws.iter().copied().zip(xs.iter().map(|x| &x[..])).collect();
        let mut fused_acc = vec![0.5f64; n];
        accumulate(&mut fused_acc, &terms);
        let mut plain = vec![0.5f64; n];
        for (w, x) in &terms {
            for (a, &v) in plain.iter_mut().zip(x.iter()) {
                *a += w * f64::from(v);
            }
        }
        assert!(fused_acc
            .iter()
            .zip(&plain)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn average_rounds_once_from_f64() {
        let base = [1.0f32, -0.0, 3.5, 0.25, 1e-3, 7.0, 8.0, 9.0, 10.0];
        let acc = [0.1f64, 0.0, -7.0, 1e-9, 3.0, 0.0, 1.0, 2.0, 1e300];
        let mut out = [0f32; 9];
        average(&mut out, &base, &acc, 3.0);
        for i in 0..9 {
            let want = (f64::from(base[i]) + acc[i] / 3.0) as f32;
            assert_eq!(out[i].to_bits(), want.to_bits(), "index {i}");
        }
        assert_eq!(
            out[1].to_bits(),
            0.0f32.to_bits(),
            "-0 + +0 is +0, as in the formula"
        );
    }

    #[test]
    fn finds_first_non_finite() {
        let mut x = vec![1.0f32; 1000];
        assert_eq!(first_non_finite(&x), None);
        x[700] = f32::NAN;
        x[900] = f32::INFINITY;
        assert_eq!(first_non_finite(&x), Some(700));
        x[3] = f32::NEG_INFINITY;
        assert_eq!(first_non_finite(&x), Some(3));
        assert_eq!(first_non_finite(&[f32::MAX, f32::MIN_POSITIVE, -0.0]), None);
    }
}
