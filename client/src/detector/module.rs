//! The tch network of a [`Graph`]: its variables created in a VarStore under the graph's
//! parameter names, and a forward pass that interprets the nodes in order.
//!
//! The graph is compiled once into steps that hold their tensors and input slots, so a forward
//! pass is one tch call per node and no name lookups; intermediate values are dropped after
//! their last reader.
//!
//! Activations run channels-last (NHWC strides on NCHW shapes): the input is laid out so, and
//! convolutions, BatchNorm and the elementwise ops keep the layout. oneDNN's channels-last
//! kernels trained this network about 18% faster on the 2-core CPU and ran inference about 25%
//! faster than the default layout (measured with PyTorch on this architecture; see
//! docs/benchmarks.md). Weights stay in the default layout, so the model state is unchanged;
//! the outputs are returned contiguous.
//!
//! Mixed precision ([`Precision::Float16`], for CUDA) is done here rather than with LibTorch's
//! autocast: tch 0.24 toggles autocast through `at::autocast::set_enabled`, which LibTorch 2.11
//! deprecates with a warning on every call (three log lines per training step on a plant's GPU).
//! The policy is autocast's for these operators: convolutions, matrix products and the
//! elementwise ops in float16 (weights cast from their float32 masters, so gradients reach
//! float32 variables), BatchNorm on float16 activations with float32 statistics, softmax in
//! float32, and the outputs returned in float32.

use std::collections::HashMap;

use fedinspect_common::arch::{Graph, Op, ParamInit};
use tch::nn::{self, Init};
use tch::{Kind, TchError, Tensor};

/// The arithmetic of a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Float32,
    /// Float16 activations and weight copies (CUDA); float32 variables and outputs.
    Float16,
}

/// BatchNorm constants, PyTorch's defaults.
const BN_MOMENTUM: f64 = 0.1;
const BN_EPS: f64 = 1e-5;

enum Step {
    Input,
    Conv {
        weight: Tensor,
        bias: Option<Tensor>,
        stride: i64,
        padding: i64,
    },
    BatchNorm {
        weight: Tensor,
        bias: Tensor,
        mean: Tensor,
        var: Tensor,
    },
    /// A BatchNorm folded into the convolution before it ([`GraphModule::folded`]).
    PassOn,
    Silu,
    Relu,
    Sigmoid,
    Add,
    Concat,
    Upsample2x,
    MaxPool {
        kernel: i64,
        stride: i64,
    },
    FlattenSpatial,
    Transpose,
    MatMul,
    Scale(f64),
    Softmax,
    ReshapeLike,
}

struct Compiled {
    step: Step,
    inputs: Vec<usize>,
    /// Values to drop once this node has run (their last reader).
    frees: Vec<usize>,
}

/// A forward-only view of a graph whose variables live in a VarStore.
pub struct GraphModule {
    nodes: Vec<Compiled>,
    outputs: Vec<usize>,
}

impl GraphModule {
    /// Creates the graph's variables under `root`, in graph order (so a seed fixes the
    /// initial weights), and compiles the forward pass. `graph` must be validated.
    pub fn new(root: &nn::Path, graph: &Graph) -> Result<Self, TchError> {
        let mut vars: HashMap<String, Tensor> = HashMap::new();
        for spec in graph.params() {
            let dims: Vec<i64> = spec.shape.iter().map(|&d| d as i64).collect();
            let init = match spec.init {
                ParamInit::Uniform { bound } => Init::Uniform {
                    lo: -f64::from(bound),
                    up: f64::from(bound),
                },
                ParamInit::Const(v) => Init::Const(f64::from(v)),
            };
            let value = nn::f_init(init, &dims, root.device(), Kind::Float)?;
            let (path, leaf) = split_name(root, &spec.name);
            let var = path.add(leaf, value, spec.trainable);
            vars.insert(spec.name, var);
        }
        let index: HashMap<&str, usize> = graph
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str(), i))
            .collect();
        let mut take = |node: &str, tensor: &str| {
            vars.remove(&format!("{node}.{tensor}"))
                .ok_or_else(|| TchError::FileFormat(format!("graph has no {node}.{tensor}")))
        };
        let mut nodes = Vec::with_capacity(graph.nodes.len());
        for node in &graph.nodes {
            let step = match &node.op {
                Op::Input => Step::Input,
                Op::Conv {
                    kernel,
                    stride,
                    bias,
                    ..
                } => Step::Conv {
                    weight: take(&node.name, "weight")?,
                    bias: if *bias {
                        Some(take(&node.name, "bias")?)
                    } else {
                        None
                    },
                    stride: i64::from(*stride),
                    padding: i64::from(*kernel / 2),
                },
                Op::BatchNorm => Step::BatchNorm {
                    weight: take(&node.name, "weight")?,
                    bias: take(&node.name, "bias")?,
                    mean: take(&node.name, "running_mean")?,
                    var: take(&node.name, "running_var")?,
                },
                Op::Silu => Step::Silu,
                Op::Relu => Step::Relu,
                Op::Sigmoid => Step::Sigmoid,
                Op::Add => Step::Add,
                Op::Concat => Step::Concat,
                Op::Upsample2x => Step::Upsample2x,
                Op::MaxPool { kernel, stride } => Step::MaxPool {
                    kernel: i64::from(*kernel),
                    stride: i64::from(*stride),
                },
                Op::FlattenSpatial => Step::FlattenSpatial,
                Op::Transpose => Step::Transpose,
                Op::MatMul => Step::MatMul,
                Op::Scale { factor } => Step::Scale(f64::from(*factor)),
                Op::Softmax => Step::Softmax,
                Op::ReshapeLike => Step::ReshapeLike,
            };
            let inputs = node
                .inputs
                .iter()
                .map(|n| index.get(n.as_str()).copied())
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| TchError::FileFormat(format!("bad inputs of {}", node.name)))?;
            nodes.push(Compiled {
                step,
                inputs,
                frees: Vec::new(),
            });
        }
        let outputs = graph
            .outputs
            .iter()
            .map(|n| index.get(n.as_str()).copied())
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| TchError::FileFormat("graph outputs are not nodes".into()))?;
        let mut last_use: Vec<Option<usize>> = vec![None; nodes.len()];
        for (i, n) in nodes.iter().enumerate() {
            for &j in &n.inputs {
                last_use[j] = Some(i);
            }
        }
        for (j, last) in last_use.into_iter().enumerate() {
            if let Some(i) = last.filter(|_| !outputs.contains(&j)) {
                nodes[i].frees.push(j);
            }
        }
        Ok(Self { nodes, outputs })
    }

    /// Runs the graph on `xs` (`[N, C, H, W]`, sides multiples of 32); `train` selects batch
    /// statistics (and running-stat updates) in BatchNorm. Returns the graph's outputs in order.
    pub fn forward(&self, xs: &Tensor, train: bool) -> Result<Vec<Tensor>, TchError> {
        self.forward_in(xs, train, Precision::Float32)
    }

    /// [`GraphModule::forward`] in the given precision; outputs are float32 either way.
    pub fn forward_in(
        &self,
        xs: &Tensor,
        train: bool,
        precision: Precision,
    ) -> Result<Vec<Tensor>, TchError> {
        let half = precision == Precision::Float16;
        let cast = |t: &Tensor| -> Result<Tensor, TchError> {
            if half {
                t.f_to_kind(Kind::Half)
            } else {
                Ok(t.shallow_clone())
            }
        };
        let mut vals: Vec<Option<Tensor>> = (0..self.nodes.len()).map(|_| None).collect();
        for (i, node) in self.nodes.iter().enumerate() {
            let arg = |k: usize| -> Result<&Tensor, TchError> {
                node.inputs
                    .get(k)
                    .and_then(|&j| vals[j].as_ref())
                    .ok_or_else(|| TchError::Kind(format!("node {i} lacks input {k}")))
            };
            let out = match &node.step {
                Step::Input => channels_last(&cast(xs)?)?,
                Step::Conv {
                    weight,
                    bias,
                    stride,
                    padding,
                } => arg(0)?.f_conv2d(
                    &cast(weight)?,
                    bias.as_ref().map(cast).transpose()?.as_ref(),
                    [*stride, *stride],
                    [*padding, *padding],
                    [1, 1],
                    1,
                )?,
                Step::BatchNorm {
                    weight,
                    bias,
                    mean,
                    var,
                } => arg(0)?.f_batch_norm(
                    Some(weight),
                    Some(bias),
                    Some(mean),
                    Some(var),
                    train,
                    BN_MOMENTUM,
                    BN_EPS,
                    true,
                )?,
                Step::PassOn => arg(0)?.shallow_clone(),
                Step::Silu => arg(0)?.f_silu()?,
                Step::Relu => arg(0)?.f_relu()?,
                Step::Sigmoid => arg(0)?.f_sigmoid()?,
                Step::Add => arg(0)?.f_add(arg(1)?)?,
                Step::Concat => {
                    let parts = (0..node.inputs.len())
                        .map(arg)
                        .collect::<Result<Vec<&Tensor>, _>>()?;
                    Tensor::f_cat(&parts, 1)?
                }
                Step::Upsample2x => {
                    let x = arg(0)?;
                    let (_, _, h, w) = x.size4()?;
                    x.f_upsample_nearest2d([h * 2, w * 2], 2.0, 2.0)?
                }
                Step::MaxPool { kernel, stride } => arg(0)?.f_max_pool2d(
                    [*kernel, *kernel],
                    [*stride, *stride],
                    [kernel / 2, kernel / 2],
                    [1, 1],
                    false,
                )?,
                Step::FlattenSpatial => arg(0)?.f_flatten(2, 3)?,
                Step::Transpose => arg(0)?.f_transpose(1, 2)?,
                Step::MatMul => arg(0)?.f_matmul(arg(1)?)?,
                Step::Scale(f) => arg(0)?.f_mul_scalar(*f)?,
                Step::Softmax if half => arg(0)?
                    .f_softmax(-1, Some(Kind::Float))?
                    .f_to_kind(Kind::Half)?,
                Step::Softmax => arg(0)?.f_softmax(-1, None::<Kind>)?,
                Step::ReshapeLike => arg(0)?.f_reshape(arg(1)?.size())?,
            };
            vals[i] = Some(out);
            for &j in &node.frees {
                vals[j] = None;
            }
        }
        self.outputs
            .iter()
            .map(|&j| {
                vals[j]
                    .take()
                    .ok_or_else(|| TchError::Kind(format!("output {j} was not computed")))?
                    .f_to_kind(Kind::Float)?
                    .f_contiguous()
            })
            .collect()
    }
}

impl GraphModule {
    /// An inference-only copy with every BatchNorm that reads a convolution (its only reader)
    /// folded into that convolution: `w' = w * g / sqrt(v + eps)` per output channel and
    /// `b' = (b - m) * g / sqrt(v + eps) + beta`, the BatchNorm node passing its input on. One
    /// memory pass less per convolution. The folded weights are a snapshot of the variables now:
    /// rebuild it after they change. Other steps share the variables' tensors.
    pub fn folded(&self) -> Result<Self, TchError> {
        let _guard = tch::no_grad_guard();
        let mut readers = vec![0usize; self.nodes.len()];
        for n in &self.nodes {
            for &j in &n.inputs {
                readers[j] += 1;
            }
        }
        for &j in &self.outputs {
            readers[j] += 1;
        }
        // conv node index -> the BatchNorm node folded into it
        let mut fold_into: HashMap<usize, usize> = HashMap::new();
        for (i, n) in self.nodes.iter().enumerate() {
            if let (Step::BatchNorm { .. }, [j]) = (&n.step, n.inputs.as_slice()) {
                if matches!(self.nodes[*j].step, Step::Conv { .. }) && readers[*j] == 1 {
                    fold_into.insert(*j, i);
                }
            }
        }
        let folded_bns: Vec<usize> = fold_into.values().copied().collect();
        let mut nodes = Vec::with_capacity(self.nodes.len());
        for (i, n) in self.nodes.iter().enumerate() {
            let step = match (&n.step, fold_into.get(&i)) {
                (
                    Step::Conv {
                        weight,
                        bias,
                        stride,
                        padding,
                    },
                    Some(&bn),
                ) => {
                    let Step::BatchNorm {
                        weight: gamma,
                        bias: beta,
                        mean,
                        var,
                    } = &self.nodes[bn].step
                    else {
                        unreachable!("fold_into holds BatchNorm nodes only")
                    };
                    let scale = gamma.f_div(&var.f_add_scalar(BN_EPS)?.f_sqrt()?)?;
                    let out_channels = weight.size()[0];
                    let w = weight.f_mul(&scale.f_view([out_channels, 1, 1, 1])?)?;
                    let b = match bias {
                        Some(b) => b.f_sub(mean)?,
                        None => mean.f_neg()?,
                    }
                    .f_mul(&scale)?
                    .f_add(beta)?;
                    Step::Conv {
                        weight: w.f_detach_copy()?,
                        bias: Some(b.f_detach_copy()?),
                        stride: *stride,
                        padding: *padding,
                    }
                }
                (Step::BatchNorm { .. }, _) if folded_bns.contains(&i) => Step::PassOn,
                (step, _) => step.shallow_clone(),
            };
            nodes.push(Compiled {
                step,
                inputs: n.inputs.clone(),
                frees: n.frees.clone(),
            });
        }
        Ok(Self {
            nodes,
            outputs: self.outputs.clone(),
        })
    }
}

impl Step {
    /// The same step sharing this one's tensors.
    fn shallow_clone(&self) -> Step {
        match self {
            Step::Input => Step::Input,
            Step::Conv {
                weight,
                bias,
                stride,
                padding,
            } => Step::Conv {
                weight: weight.shallow_clone(),
                bias: bias.as_ref().map(Tensor::shallow_clone),
                stride: *stride,
                padding: *padding,
            },
            Step::BatchNorm {
                weight,
                bias,
                mean,
                var,
            } => Step::BatchNorm {
                weight: weight.shallow_clone(),
                bias: bias.shallow_clone(),
                mean: mean.shallow_clone(),
                var: var.shallow_clone(),
            },
            Step::PassOn => Step::PassOn,
            Step::Silu => Step::Silu,
            Step::Relu => Step::Relu,
            Step::Sigmoid => Step::Sigmoid,
            Step::Add => Step::Add,
            Step::Concat => Step::Concat,
            Step::Upsample2x => Step::Upsample2x,
            Step::MaxPool { kernel, stride } => Step::MaxPool {
                kernel: *kernel,
                stride: *stride,
            },
            Step::FlattenSpatial => Step::FlattenSpatial,
            Step::Transpose => Step::Transpose,
            Step::MatMul => Step::MatMul,
            Step::Scale(f) => Step::Scale(*f),
            Step::Softmax => Step::Softmax,
            Step::ReshapeLike => Step::ReshapeLike,
        }
    }
}

/// `x` (`[N, C, H, W]`) with NHWC strides, the layout oneDNN's and cuDNN's fastest convolution
/// kernels use; other ranks unchanged.
fn channels_last(x: &Tensor) -> Result<Tensor, TchError> {
    if x.dim() != 4 {
        return Ok(x.shallow_clone());
    }
    x.f_permute([0, 2, 3, 1])?
        .f_contiguous()?
        .f_permute([0, 3, 1, 2])
}

/// `a.b.c.weight` to the path `a/b/c` under `root` and the leaf `weight`.
fn split_name<'a, 'n>(root: &nn::Path<'a>, name: &'n str) -> (nn::Path<'a>, &'n str) {
    let mut parts: Vec<&str> = name.split('.').collect();
    let leaf = parts.pop().unwrap_or(name);
    let path = parts.into_iter().fold(root.clone(), |p, part| p.sub(part));
    (path, leaf)
}

#[cfg(test)]
mod tests {
    use fedinspect_common::arch::{ArchConfig, ConvInit, Node};
    use tch::{Device, IndexOp};

    use super::*;

    fn node(name: &str, op: Op, inputs: &[&str], channels: u32) -> Node {
        Node {
            name: name.into(),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            channels,
        }
    }

    #[test]
    fn default_graph_produces_stride_4_heads() {
        tch::set_num_threads(1);
        let cfg = ArchConfig {
            width: 0.25,
            ..ArchConfig::default()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let m = GraphModule::new(&vs.root(), &cfg.graph().unwrap()).unwrap();
        let x = Tensor::rand([2, 2, 64, 96], (Kind::Float, Device::Cpu));
        let out = tch::no_grad(|| m.forward(&x, false)).unwrap();
        assert_eq!(out[0].size(), [2, 6, 16, 24]);
        assert_eq!(out[1].size(), [2, 4, 16, 24]);
        let bias = vs.root().sub("head").sub("heatmap").get("bias").unwrap();
        assert!(bias.allclose(
            &Tensor::full([6], -2.19, (Kind::Float, Device::Cpu)),
            0.0,
            1e-6,
            false
        ));
    }

    #[test]
    fn float16_forward_tracks_float32_and_trains_float32_variables() {
        tch::set_num_threads(1);
        tch::manual_seed(3);
        let cfg = ArchConfig {
            width: 0.25,
            ..ArchConfig::default()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let m = GraphModule::new(&vs.root(), &cfg.graph().unwrap()).unwrap();
        let x = Tensor::rand([1, 2, 64, 64], (Kind::Float, Device::Cpu));
        let full = tch::no_grad(|| m.forward(&x, false)).unwrap();
        let half = tch::no_grad(|| m.forward_in(&x, false, Precision::Float16)).unwrap();
        for (f, h) in full.iter().zip(&half) {
            assert_eq!(h.kind(), Kind::Float, "outputs come back in float32");
            assert_eq!(f.size(), h.size());
            let scale = f.abs().max().double_value(&[]).max(1.0);
            let diff = (f - h).abs().max().double_value(&[]);
            assert!(
                diff < 2e-2 * scale,
                "float16 output off by {diff} (scale {scale})"
            );
            assert!(diff > 0.0, "the float16 path did not run in float16");
        }
        // Gradients of a float16 forward land on the float32 variables.
        let out = m.forward_in(&x, true, Precision::Float16).unwrap();
        out[0].sum(Kind::Float).backward();
        let w = vs.root().sub("head").sub("heatmap").get("weight").unwrap();
        assert_eq!(w.kind(), Kind::Float);
        assert!(w.grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn folded_batchnorm_gives_the_same_outputs_with_fewer_steps() {
        tch::set_num_threads(1);
        let cfg = ArchConfig {
            width: 0.25,
            ..ArchConfig::default()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let m = GraphModule::new(&vs.root(), &cfg.graph().unwrap()).unwrap();
        // Statistics and affine parameters far from their initial 0/1, as after training.
        tch::no_grad(|| {
            for (name, mut t) in vs.variables() {
                let fill = match name.rsplit('.').next() {
                    Some("running_mean") | Some("bias") => t.rand_like() - 0.5,
                    Some("running_var") => t.rand_like() * 2.0 + 0.1,
                    Some("weight") if t.dim() == 1 => t.rand_like() + 0.5,
                    _ => continue,
                };
                t.copy_(&fill);
            }
        });
        let folded = m.folded().unwrap();
        let passes = folded
            .nodes
            .iter()
            .filter(|n| matches!(n.step, Step::PassOn))
            .count();
        let bns = m
            .nodes
            .iter()
            .filter(|n| matches!(n.step, Step::BatchNorm { .. }))
            .count();
        assert!(
            passes > 0 && passes == bns,
            "{passes} of {bns} BatchNorms folded"
        );
        let x = Tensor::rand([2, 2, 64, 64], (Kind::Float, Device::Cpu));
        let want = tch::no_grad(|| m.forward(&x, false)).unwrap();
        let got = tch::no_grad(|| folded.forward(&x, false)).unwrap();
        for (w, g) in want.iter().zip(&got) {
            let scale = w.abs().max().double_value(&[]).max(1.0);
            let diff = (w - g).abs().max().double_value(&[]);
            assert!(
                diff < 1e-4 * scale,
                "folded output off by {diff} (scale {scale})"
            );
        }
    }

    #[test]
    fn outputs_are_contiguous_despite_channels_last_activations() {
        tch::set_num_threads(1);
        let cfg = ArchConfig {
            width: 0.25,
            ..ArchConfig::default()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let m = GraphModule::new(&vs.root(), &cfg.graph().unwrap()).unwrap();
        let x = Tensor::rand([2, 2, 64, 64], (Kind::Float, Device::Cpu));
        let out = tch::no_grad(|| m.forward(&x, false)).unwrap();
        assert!(out.iter().all(|t| t.is_contiguous()));
        // A contiguous view works (decoding flattens the heatmap with view).
        assert_eq!(out[0].view([2, -1]).size(), [2, 6 * 16 * 16]);
    }

    #[test]
    fn interprets_the_ops_the_default_graph_does_not_use() {
        // relu(maxpool(x)) ++ sigmoid(x), with x a known 1-channel image.
        let conv = Op::Conv {
            kernel: 1,
            stride: 1,
            bias: false,
            init: ConvInit::Default,
        };
        let graph = Graph {
            in_channels: 1,
            nodes: vec![
                node("input", Op::Input, &[], 1),
                node(
                    "pool",
                    Op::MaxPool {
                        kernel: 3,
                        stride: 2,
                    },
                    &["input"],
                    1,
                ),
                node("relu", Op::Relu, &["pool"], 1),
                node("up", Op::Upsample2x, &["relu"], 1),
                node("sig", Op::Sigmoid, &["input"], 1),
                node("cat", Op::Concat, &["up", "sig"], 2),
                node("mix", conv, &["cat"], 1),
            ],
            outputs: vec!["cat".into(), "mix".into()],
        };
        graph.validate().unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let m = GraphModule::new(&vs.root(), &graph).unwrap();
        let x = Tensor::from_slice(&[-1f32, -2.0, -3.0, 4.0]).view([1, 1, 2, 2]);
        let out = m.forward(&x, false).unwrap();
        assert_eq!(out[0].size(), [1, 2, 2, 2]);
        let up = out[0].i((0, 0));
        assert!(up.allclose(
            &Tensor::full([2, 2], 4.0, (Kind::Float, Device::Cpu)),
            0.0,
            0.0,
            false
        ));
        let sig = out[0].i((0, 1));
        assert!(sig.allclose(&x.sigmoid().view([2, 2]), 0.0, 1e-7, false));
        assert_eq!(out[1].size(), [1, 1, 2, 2]);
    }
}
