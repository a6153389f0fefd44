//! What a [`Graph`] implies: validation by shape inference, its parameter tensors and their
//! initialisation, and its cost in multiply-accumulates.

use std::collections::HashMap;

use super::{ArchError, ConvInit, Graph, Node, Op, ParamInit, ParamSpec};

/// Axis of a token matrix: channels, or the spatial positions of a map at a stride.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Axis {
    Ch(u32),
    Pos(u32),
}

/// Symbolic shape of a node's output, without the batch axis.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Shape {
    Map { c: u32, stride: u32 },
    Tokens(Axis, Axis),
}

impl Shape {
    fn axis1(&self) -> u32 {
        match *self {
            Shape::Map { c, .. } | Shape::Tokens(Axis::Ch(c), _) => c,
            Shape::Tokens(Axis::Pos(_), _) => 0,
        }
    }
}

impl Graph {
    /// Checks names, order, arities, channel counts and strides, reporting every problem.
    pub fn validate(&self) -> Result<(), ArchError> {
        let (_, problems) = self.infer();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ArchError::Graph(problems))
        }
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Every tensor the graph owns, in node order. Names are `<node>.<tensor>`.
    pub fn params(&self) -> Vec<ParamSpec> {
        let channels: HashMap<&str, u32> = self
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.channels))
            .collect();
        let mut out = Vec::new();
        for node in &self.nodes {
            let spec = |tensor: &str, shape: Vec<usize>, init, trainable| ParamSpec {
                name: format!("{}.{tensor}", node.name),
                shape,
                init,
                trainable,
            };
            let c = node.channels as usize;
            match &node.op {
                Op::Conv {
                    kernel, bias, init, ..
                } => {
                    let cin = node
                        .inputs
                        .first()
                        .and_then(|i| channels.get(i.as_str()))
                        .copied()
                        .unwrap_or(0) as usize;
                    let k = *kernel as usize;
                    let fan_in = cin * k * k;
                    let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
                    let (w_init, b_init) = match *init {
                        ConvInit::Default => {
                            (ParamInit::Uniform { bound }, ParamInit::Uniform { bound })
                        }
                        ConvInit::Zeros => (ParamInit::Const(0.0), ParamInit::Const(0.0)),
                        ConvInit::BiasConst(v) => {
                            (ParamInit::Uniform { bound }, ParamInit::Const(v))
                        }
                    };
                    out.push(spec("weight", vec![c, cin, k, k], w_init, true));
                    if *bias {
                        out.push(spec("bias", vec![c], b_init, true));
                    }
                }
                Op::BatchNorm => {
                    out.push(spec("weight", vec![c], ParamInit::Const(1.0), true));
                    out.push(spec("bias", vec![c], ParamInit::Const(0.0), true));
                    out.push(spec("running_mean", vec![c], ParamInit::Const(0.0), false));
                    out.push(spec("running_var", vec![c], ParamInit::Const(1.0), false));
                }
                _ => {}
            }
        }
        out
    }

    /// Trainable parameters (what PyTorch's `parameters()` counts).
    pub fn num_trainable(&self) -> usize {
        self.params()
            .iter()
            .filter(|p| p.trainable)
            .map(|p| p.shape.iter().product::<usize>())
            .sum()
    }

    /// All values of the model state, BatchNorm running statistics included.
    pub fn num_values(&self) -> usize {
        self.params()
            .iter()
            .map(|p| p.shape.iter().product::<usize>())
            .sum()
    }

    /// Multiply-accumulates of one forward pass on a `height x width` input (sides multiples
    /// of 32), counting convolutions and matrix products.
    pub fn macs(&self, height: u32, width: u32) -> u64 {
        let (shapes, _) = self.infer();
        let positions = |stride: u32| u64::from(height / stride) * u64::from(width / stride);
        let axis = |a: Axis| match a {
            Axis::Ch(c) => u64::from(c),
            Axis::Pos(s) => positions(s),
        };
        let mut total = 0u64;
        for (i, node) in self.nodes.iter().enumerate() {
            let input = |j: usize| {
                node.inputs
                    .get(j)
                    .and_then(|n| self.nodes.iter().position(|m| &m.name == n))
                    .and_then(|p| shapes[p])
            };
            match (&node.op, shapes[i], input(0), input(1)) {
                (
                    Op::Conv { kernel, .. },
                    Some(Shape::Map { c, stride }),
                    Some(Shape::Map { c: cin, .. }),
                    _,
                ) => {
                    let k = u64::from(*kernel);
                    total += k * k * u64::from(cin) * u64::from(c) * positions(stride);
                }
                (Op::MatMul, _, Some(Shape::Tokens(a, b)), Some(Shape::Tokens(_, c))) => {
                    total += axis(a) * axis(b) * axis(c);
                }
                _ => {}
            }
        }
        total
    }

    /// Output shape of every node (None where it cannot be inferred) and the problems found.
    fn infer(&self) -> (Vec<Option<Shape>>, Vec<String>) {
        let mut problems = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut shapes: Vec<Option<Shape>> = Vec::with_capacity(self.nodes.len());
        for (i, node) in self.nodes.iter().enumerate() {
            if !valid_name(&node.name) {
                problems.push(format!(
                    "node name '{}' must be dot-separated parts of [a-z0-9_]",
                    node.name
                ));
            }
            if index.insert(node.name.as_str(), i).is_some() {
                problems.push(format!("node name '{}' appears twice", node.name));
            }
            let mut inputs = Vec::with_capacity(node.inputs.len());
            for name in &node.inputs {
                match index.get(name.as_str()) {
                    Some(&j) if j < i => inputs.push(shapes[j]),
                    _ => problems.push(format!(
                        "node '{}' reads '{name}', which is not an earlier node",
                        node.name
                    )),
                }
            }
            let shape = if inputs.len() == node.inputs.len() && inputs.iter().all(Option::is_some) {
                let inputs: Vec<Shape> = inputs.into_iter().flatten().collect();
                match output_shape(node, &inputs, self.in_channels, i) {
                    Ok(s) => Some(s),
                    Err(why) => {
                        problems.push(format!("node '{}': {why}", node.name));
                        None
                    }
                }
            } else {
                None
            };
            if let Some(s) = shape {
                if s.axis1() != node.channels {
                    problems.push(format!(
                        "node '{}' declares {} channels but computes {}",
                        node.name,
                        node.channels,
                        s.axis1()
                    ));
                }
            }
            shapes.push(shape);
        }
        if self.outputs.is_empty() {
            problems.push("graph has no outputs".to_string());
        }
        for out in &self.outputs {
            match index.get(out.as_str()).map(|&i| shapes[i]) {
                None => problems.push(format!("output '{out}' is not a node")),
                Some(Some(Shape::Map { .. })) | Some(None) => {}
                Some(Some(_)) => problems.push(format!("output '{out}' is not a feature map")),
            }
        }
        (shapes, problems)
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
}

/// The shape `node` produces from `inputs`, or why it cannot.
fn output_shape(
    node: &Node,
    inputs: &[Shape],
    in_channels: u32,
    position: usize,
) -> Result<Shape, String> {
    let arity = match node.op {
        Op::Input => 0,
        Op::Add | Op::MatMul | Op::ReshapeLike => 2,
        Op::Concat => inputs.len().max(2),
        _ => 1,
    };
    if inputs.len() != arity {
        return Err(format!("takes {arity} inputs, has {}", inputs.len()));
    }
    let map = |s: Shape| match s {
        Shape::Map { c, stride } => Ok((c, stride)),
        Shape::Tokens(..) => Err("needs a feature map input".to_string()),
    };
    match &node.op {
        Op::Input if position == 0 => Ok(Shape::Map {
            c: in_channels,
            stride: 1,
        }),
        Op::Input => Err("the input must be the first node, and only it".into()),
        Op::Conv { kernel, stride, .. } => {
            let (_, s) = map(inputs[0])?;
            if kernel % 2 == 0 || !(1..=7).contains(kernel) || !(1..=2).contains(stride) {
                return Err(format!(
                    "kernel {kernel} stride {stride}: use an odd kernel up to 7, stride 1 or 2"
                ));
            }
            if node.channels == 0 {
                return Err("a conv needs at least one output channel".into());
            }
            Ok(Shape::Map {
                c: node.channels,
                stride: s * stride,
            })
        }
        Op::MaxPool { kernel, stride } => {
            let (c, s) = map(inputs[0])?;
            if kernel % 2 == 0 || !(1..=2).contains(stride) {
                return Err(format!("max pool kernel {kernel} stride {stride}"));
            }
            Ok(Shape::Map {
                c,
                stride: s * stride,
            })
        }
        Op::BatchNorm => map(inputs[0]).map(|_| inputs[0]),
        Op::Silu | Op::Relu | Op::Sigmoid | Op::Scale { .. } | Op::Softmax => Ok(inputs[0]),
        Op::Add if inputs[0] == inputs[1] => Ok(inputs[0]),
        Op::Add => Err(format!("adds {:?} to {:?}", inputs[0], inputs[1])),
        Op::Concat => {
            let (mut total, stride) = map(inputs[0])?;
            for &s in &inputs[1..] {
                let (c, s2) = map(s)?;
                if s2 != stride {
                    return Err("concatenates maps of different strides".into());
                }
                total += c;
            }
            Ok(Shape::Map { c: total, stride })
        }
        Op::Upsample2x => match map(inputs[0])? {
            (c, s) if s % 2 == 0 => Ok(Shape::Map { c, stride: s / 2 }),
            _ => Err("upsamples a map finer than the input".into()),
        },
        Op::FlattenSpatial => {
            let (c, s) = map(inputs[0])?;
            Ok(Shape::Tokens(Axis::Ch(c), Axis::Pos(s)))
        }
        Op::Transpose => match inputs[0] {
            Shape::Tokens(a, b) => Ok(Shape::Tokens(b, a)),
            Shape::Map { .. } => Err("transposes a feature map".into()),
        },
        Op::MatMul => match (inputs[0], inputs[1]) {
            (Shape::Tokens(a, b), Shape::Tokens(b2, c)) if b == b2 => Ok(Shape::Tokens(a, c)),
            (x, y) => Err(format!("multiplies {x:?} by {y:?}")),
        },
        Op::ReshapeLike => match (inputs[0], inputs[1]) {
            (Shape::Tokens(Axis::Ch(c), Axis::Pos(s)), Shape::Map { c: c2, stride })
                if c == c2 && s == stride =>
            {
                Ok(inputs[1])
            }
            (x, y) => Err(format!("reshapes {x:?} like {y:?}")),
        },
    }
}
