//! Conversion between [`ModelState`] and a tch `VarStore`: the only place where federation
//! tensors meet LibTorch tensors. It lives in the client, not in `common`, so that the
//! coordinator and the rest of `common` never link LibTorch.
//!
//! Every VarStore variable is included, trainable or not: BatchNorm running statistics are
//! VarStore variables in tch (created by `zeros_no_train` / `ones_no_train`) and are part of
//! the model, so they are averaged and shipped with the weights. Names are checked both ways
//! (a VarStore variable missing from the state is as much an error as an extra tensor in the
//! state) and shapes must agree exactly. Each direction copies the values once.

use tch::nn::VarStore;
use tch::{Device, Kind, TchError};

use fedinspect_common::model::{ModelError, ModelState, Tensor};

/// Why a state and a VarStore do not fit together.
#[derive(Debug, thiserror::Error)]
pub enum TorchError {
    #[error(
        "model and network disagree on tensor names: missing from the model {missing:?}, \
         unknown to the network {unexpected:?}; the model was made for another architecture"
    )]
    NameMismatch {
        missing: Vec<String>,
        unexpected: Vec<String>,
    },
    #[error("tensor '{name}' has shape {got:?} but the network expects {expected:?}; the model was made for another architecture")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("variable '{name}' has negative dimension in {shape:?}")]
    BadShape { name: String, shape: Vec<i64> },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("libtorch: {0}")]
    Tch(#[from] TchError),
}

/// Reads every variable of `vs` (as float32, in name order).
pub fn state_from_var_store(vs: &VarStore) -> Result<ModelState, TorchError> {
    let _guard = tch::no_grad_guard();
    let mut state = ModelState::new();
    let mut vars: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, var) in vars {
        let shape = usize_shape(&name, &var.size())?;
        // No-ops (no copy) for the usual contiguous f32 CPU variable.
        let src = var
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?;
        let numel = src.numel();
        let mut data = vec![0f32; numel];
        src.f_copy_data(&mut data, numel)?;
        state.insert(name, Tensor::new(shape, data)?)?;
    }
    Ok(state)
}

/// Overwrites every variable of `vs` with `state`'s values; names and shapes must match
/// exactly, and nothing is written unless they do.
pub fn load_state_into_var_store(state: &ModelState, vs: &mut VarStore) -> Result<(), TorchError> {
    let vars = vs.variables();
    let missing: Vec<String> = sorted(vars.keys().filter(|k| state.get(k).is_none()));
    let mut unexpected: Vec<String> = state
        .names()
        .filter(|n| !vars.contains_key(*n))
        .map(str::to_string)
        .collect();
    unexpected.sort();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(TorchError::NameMismatch {
            missing,
            unexpected,
        });
    }
    for (name, var) in &vars {
        let expected = usize_shape(name, &var.size())?;
        let got = state
            .get(name)
            .map(|t| t.shape().to_vec())
            .unwrap_or_default();
        if expected != got {
            return Err(TorchError::ShapeMismatch {
                name: name.clone(),
                expected,
                got,
            });
        }
    }
    let _guard = tch::no_grad_guard();
    for (name, mut var) in vars {
        let Some(t) = state.get(&name) else { continue };
        let dims = var.size();
        // SAFETY: `src` borrows `t`'s buffer, which holds exactly numel(dims) f32 values
        // (shapes were checked above) and outlives `src`: it is dropped at the end of this
        // iteration, after `f_copy_` has finished copying (copy_ is synchronous for a CPU
        // source). Nothing writes through `src`.
        let src = unsafe {
            tch::Tensor::f_from_blob(
                t.data().as_ptr().cast::<u8>(),
                &dims,
                &[],
                Kind::Float,
                Device::Cpu,
            )?
        };
        var.f_copy_(&src)?;
    }
    Ok(())
}

fn sorted<'a>(names: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut v: Vec<String> = names.cloned().collect();
    v.sort();
    v
}

fn usize_shape(name: &str, dims: &[i64]) -> Result<Vec<usize>, TorchError> {
    dims.iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| TorchError::BadShape {
            name: name.to_string(),
            shape: dims.to_vec(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn;

    fn small_net(vs: &VarStore) {
        let root = vs.root();
        let _ = nn::conv2d(&root / "conv", 2, 4, 3, Default::default());
        let _ = nn::batch_norm2d(&root / "bn", 4, Default::default());
    }

    #[test]
    fn round_trip_keeps_every_variable_including_running_stats() {
        tch::set_num_threads(1);
        tch::manual_seed(1);
        let vs = VarStore::new(Device::Cpu);
        small_net(&vs);
        let state = state_from_var_store(&vs).unwrap();
        let names: Vec<&str> = state.names().collect();
        assert_eq!(
            names,
            [
                "bn.bias",
                "bn.running_mean",
                "bn.running_var",
                "bn.weight",
                "conv.bias",
                "conv.weight"
            ]
        );
        assert_eq!(state.get("conv.weight").unwrap().shape(), [4, 2, 3, 3]);
        assert_eq!(state.get("bn.running_var").unwrap().data(), [1.0; 4]);

        let mut changed = state.clone();
        for (_, t) in changed.iter_mut() {
            for (i, v) in t.data_mut().iter_mut().enumerate() {
                *v = i as f32 * 0.5 - 1.0;
            }
        }
        tch::manual_seed(2);
        let mut other = VarStore::new(Device::Cpu);
        small_net(&other);
        load_state_into_var_store(&changed, &mut other).unwrap();
        let back = state_from_var_store(&other).unwrap();
        assert_eq!(back, changed);
        assert_eq!(back.content_hash(), changed.content_hash());
    }

    #[test]
    fn names_are_checked_both_ways_and_shapes_exactly() {
        let vs = VarStore::new(Device::Cpu);
        small_net(&vs);
        let state = state_from_var_store(&vs).unwrap();

        let mut mut_vs = VarStore::new(Device::Cpu);
        small_net(&mut_vs);
        let _ = mut_vs.root().zeros("extra", &[2]);
        let mut renamed = ModelState::new();
        for (name, t) in state.iter() {
            let name = if name == "bn.bias" { "bn.beta" } else { name };
            renamed.insert(name, t.clone()).unwrap();
        }
        match load_state_into_var_store(&renamed, &mut mut_vs) {
            Err(TorchError::NameMismatch {
                missing,
                unexpected,
            }) => {
                assert_eq!(missing, ["bn.bias", "extra"]);
                assert_eq!(unexpected, ["bn.beta"]);
            }
            other => panic!("expected a name mismatch, got {other:?}"),
        }

        let mut reshaped = ModelState::new();
        for (name, t) in state.iter() {
            let t = if name == "conv.weight" {
                Tensor::new(vec![4, 18], t.data().to_vec()).unwrap()
            } else {
                t.clone()
            };
            reshaped.insert(name, t).unwrap();
        }
        let mut target = VarStore::new(Device::Cpu);
        small_net(&target);
        let before = state_from_var_store(&target).unwrap();
        let err = load_state_into_var_store(&reshaped, &mut target).unwrap_err();
        assert!(matches!(err, TorchError::ShapeMismatch { ref name, .. } if name == "conv.weight"));
        assert_eq!(
            state_from_var_store(&target).unwrap(),
            before,
            "nothing written"
        );
    }
}
