//! Tail averaging for a study: the element-wise mean of a method's last N models (the
//! federation's last N published versions, a baseline's last N rounds), scored beside each
//! method's last model (`data.tail_mean`). Late in a long study the federated map_33 wanders
//! by a few thousandths from round to round while the centralised model is flat; averaging
//! the weights of consecutive models (as stochastic weight averaging does along one training
//! run) removes wander that is noise around a common optimum, and doing it for every method
//! keeps the comparison at the same budget fair. Weights and BatchNorm statistics are
//! averaged alike, uniformly, accumulated in f64 and rounded to f32 once.

use std::collections::VecDeque;

use anyhow::{bail, Context, Result};
use fedinspect_common::{ModelState, Tensor};

/// The last `capacity` models of one method, oldest first, with the rounds they came from.
pub struct TailWindow {
    capacity: usize,
    models: VecDeque<(u64, ModelState)>,
}

impl TailWindow {
    /// A window of the last `capacity` models; 0 keeps none (tail averaging off).
    pub fn new(capacity: u32) -> Self {
        Self {
            capacity: capacity as usize,
            models: VecDeque::new(),
        }
    }

    /// Keeps `model` (after round `round`), dropping the oldest beyond the window.
    pub fn push(&mut self, round: u64, model: &ModelState) {
        if self.capacity == 0 {
            return;
        }
        if self.models.len() == self.capacity {
            self.models.pop_front();
        }
        self.models.push_back((round, model.clone()));
    }

    /// Models in the window now.
    pub fn len(&self) -> usize {
        self.models.len()
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    /// The first and last round in the window and the mean of its models; `None` when empty.
    pub fn mean(&self) -> Result<Option<((u64, u64), ModelState)>> {
        let (Some((first, _)), Some((last, _))) = (self.models.front(), self.models.back()) else {
            return Ok(None);
        };
        let models: Vec<&ModelState> = self.models.iter().map(|(_, m)| m).collect();
        Ok(Some(((*first, *last), mean_of(&models)?)))
    }
}

/// The element-wise mean of `models`, which must hold the same tensor names and shapes.
pub fn mean_of(models: &[&ModelState]) -> Result<ModelState> {
    let Some(first) = models.first() else {
        bail!("the mean of no models is undefined");
    };
    let mut sums: Vec<(String, Vec<usize>, Vec<f64>)> = first
        .iter()
        .map(|(n, t)| (n.to_string(), t.shape().to_vec(), vec![0.0; t.numel()]))
        .collect();
    for (i, model) in models.iter().enumerate() {
        if model.len() != sums.len() {
            bail!(
                "model {} of the mean has {} tensors, the first has {}",
                i + 1,
                model.len(),
                sums.len()
            );
        }
        for (name, shape, sum) in &mut sums {
            let t = model
                .get(name)
                .filter(|t| t.shape() == shape.as_slice())
                .with_context(|| {
                    format!(
                        "model {} of the mean lacks {name} of shape {shape:?} (models of different detectors cannot be averaged)",
                        i + 1
                    )
                })?;
            for (s, &x) in sum.iter_mut().zip(t.data()) {
                *s += f64::from(x);
            }
        }
    }
    let n = models.len() as f64;
    let tensors = sums
        .into_iter()
        .map(|(name, shape, sum)| {
            let data = sum.into_iter().map(|s| (s / n) as f32).collect();
            Tensor::new(shape, data).map(|t| (name, t))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ModelState::from_tensors(tensors)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(a: &[f32], b: f32) -> ModelState {
        ModelState::from_tensors(vec![
            (
                "a".to_string(),
                Tensor::new(vec![a.len()], a.to_vec()).unwrap(),
            ),
            ("b".to_string(), Tensor::new(vec![1], vec![b]).unwrap()),
        ])
        .unwrap()
    }

    #[test]
    fn mean_is_element_wise_and_uniform() {
        let m = mean_of(&[&model(&[1.0, 2.0], 0.0), &model(&[3.0, 6.0], 3.0)]).unwrap();
        assert_eq!(m.get("a").unwrap().data(), &[2.0, 4.0]);
        assert_eq!(m.get("b").unwrap().data(), &[1.5]);
    }

    #[test]
    fn mean_of_one_model_is_that_model_bit_for_bit() {
        let x = model(&[0.1, -7.3e-8], 1.0e30);
        let m = mean_of(&[&x]).unwrap();
        assert_eq!(m.content_hash(), x.content_hash());
    }

    #[test]
    fn window_keeps_the_last_models_and_their_rounds() {
        let mut w = TailWindow::new(2);
        assert!(w.mean().unwrap().is_none());
        w.push(1, &model(&[100.0, 100.0], 100.0));
        w.push(2, &model(&[1.0, 1.0], 1.0));
        w.push(3, &model(&[3.0, 5.0], 2.0));
        let ((first, last), m) = w.mean().unwrap().unwrap();
        assert_eq!((first, last), (2, 3));
        assert_eq!(m.get("a").unwrap().data(), &[2.0, 3.0]);
        assert_eq!(m.get("b").unwrap().data(), &[1.5]);
    }

    #[test]
    fn window_of_zero_keeps_nothing() {
        let mut w = TailWindow::new(0);
        w.push(1, &model(&[1.0], 1.0));
        assert!(w.mean().unwrap().is_none());
    }

    #[test]
    fn mismatched_models_are_refused_by_name() {
        let other = ModelState::from_tensors(vec![
            ("a".to_string(), Tensor::new(vec![3], vec![0.0; 3]).unwrap()),
            ("b".to_string(), Tensor::new(vec![1], vec![0.0]).unwrap()),
        ])
        .unwrap();
        let e = mean_of(&[&model(&[1.0, 2.0], 0.0), &other]).unwrap_err();
        assert!(e.to_string().contains("lacks a of shape [2]"), "{e}");
        assert!(mean_of(&[]).is_err());
    }
}
