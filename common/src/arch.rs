//! The detector architecture as data: an [`ArchConfig`] expands, through
//! [`ArchConfig::graph`], into an explicit [`Graph`] of named nodes that the tch module (in
//! the client) interprets today and an ONNX emitter can walk later.
//!
//! # The network
//! A compact CenterNet. Backbone: a stride-2 stem, then four stages to strides 4, 8, 16 and 32,
//! each a stride-2 downsampling conv followed by residual blocks (two 3x3 conv-BN-SiLU, plus
//! the block input). At stride 32 an optional single-head self-attention block (1x1 q/k/v
//! convs, `softmax(q^T k / sqrt(d))`, 1x1 projection starting at zero, residual). Neck: FPN
//! laterals (1x1 convs) from all four stages, merged top-down by nearest x2 upsampling and
//! addition down to stride 4. Head at stride 4: two branches, each a 3x3 conv + SiLU and a 1x1
//! conv: `head.heatmap` (class logits, bias starting at -2.19 so sigmoid ~ 0.1) and `head.box`
//! (4 channels: box width and height in output cells, then the x and y offset of the centre
//! inside its cell).
//!
//! Only ops that ONNX and TensorRT handle well appear ([`Op`]): Conv, BatchNormalization,
//! Sigmoid/SiLU (Sigmoid + Mul in ONNX)/Relu, Add, Concat, Resize (nearest, x2), MaxPool,
//! MatMul, Softmax, Mul by a constant, Reshape and Transpose.
//!
//! # Parameter names: the federation's wire contract
//! Every tensor of a model is named `<node name>.<tensor>`, where node names are dot paths:
//!
//! | node | tensors |
//! |---|---|
//! | `Conv` | `weight` `[out, in, k, k]`, `bias` `[out]` when it has one |
//! | `BatchNorm` | `weight`, `bias`, `running_mean`, `running_var`, each `[channels]` |
//!
//! Conv-BN-SiLU units are three nodes `<unit>.conv`, `<unit>.bn`, `<unit>.act`. Units:
//! `backbone.stem`; per stage `i` in 1..=4, `backbone.s<i>.down` and in block `j`
//! `backbone.s<i>.b<j>.cv1`, `backbone.s<i>.b<j>.cv2`. Plain convs (with bias):
//! `backbone.attn.{q,k,v,proj}`, `neck.lateral<i>` for stage `i`, `head.heatmap_hidden`,
//! `head.heatmap`, `head.box_hidden`, `head.box`. Examples: `backbone.s1.b0.cv1.conv.weight`,
//! `backbone.s4.down.bn.running_var`, `neck.lateral3.weight`, `head.heatmap.bias`.
//!
//! BatchNorm running statistics travel with the weights (they are VarStore variables in tch and
//! buffers in PyTorch), so an aggregated model evaluates without recalibration. PyTorch's
//! `num_batches_tracked` counter is not part of the contract. The exact list for the default
//! configuration is pinned by `arch/default_params.golden`; renaming a node is a breaking
//! change of every stored model and every client.

mod build;
mod graph;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

/// Base channel widths of the stem and the four stages at width multiplier 1.
pub const BASE_WIDTHS: [u32; 5] = [16, 32, 64, 96, 128];
/// Base residual blocks per stage at depth multiplier 1.
pub const BASE_DEPTHS: [u32; 4] = [1, 1, 1, 1];
/// Output stride of the head: heatmap cells are `OUTPUT_STRIDE` input pixels wide.
pub const OUTPUT_STRIDE: u32 = 4;
/// The coarsest feature stride; input sides must be multiples of it.
pub const MAX_STRIDE: u32 = 32;
/// Initial heatmap bias: `-ln((1 - 0.1) / 0.1)`, a prior probability of 0.1 per cell.
pub const HEATMAP_PRIOR_BIAS: f32 = -2.19;
/// Name of the graph's input node.
pub const INPUT: &str = "input";
/// Name of the class heatmap output node (logits, `[N, num_classes, H/4, W/4]`).
pub const HEATMAP: &str = "head.heatmap";
/// Name of the box regression output node (`[N, 4, H/4, W/4]`: w, h, dx, dy in cells).
pub const BOX: &str = "head.box";
/// Channels of the box regression output.
pub const BOX_CHANNELS: u32 = 4;

/// What to build. The default is the DeepPCB detector (2 input channels: tested image and
/// aligned template; 6 defect classes): about 0.86M parameters and 0.82 GMAC per 320x320 crop,
/// against the PyTorch baseline's 0.72M parameters and about 1.0 GMAC.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchConfig {
    /// 1 (grey), 2 (grey image + aligned defect-free template) or 3 (RGB).
    pub in_channels: u32,
    pub num_classes: u32,
    /// Square side, a multiple of 32, that inference letterboxes images to (and an ONNX export
    /// fixes). The network itself accepts any input whose sides are multiples of 32.
    pub input_size: u32,
    /// Channel multiplier on [`BASE_WIDTHS`]; widths round to multiples of 8, at least 8.
    pub width: f64,
    /// Multiplier on [`BASE_DEPTHS`]; block counts round to the nearest integer, at least 1.
    pub depth: f64,
    /// Self-attention block at stride 32.
    pub attention: bool,
    /// Channels of the FPN laterals and of the merged stride-4 map.
    pub fpn_width: u32,
    /// Channels of the hidden 3x3 conv of each head branch.
    pub head_width: u32,
}

impl Default for ArchConfig {
    fn default() -> Self {
        Self {
            in_channels: 2,
            num_classes: 6,
            input_size: 640,
            width: 1.0,
            depth: 1.0,
            attention: true,
            fpn_width: 64,
            head_width: 48,
        }
    }
}

/// A problem with an architecture description; every problem found is listed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ArchError {
    #[error("invalid architecture config: {}", .0.join("; "))]
    Config(Vec<String>),
    #[error("invalid architecture graph: {}", .0.join("; "))]
    Graph(Vec<String>),
}

/// One operation. Feature maps are `[N, C, H, W]`; the attention block also uses token
/// matrices `[N, A, B]` whose axes are channels or spatial positions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// The network input `[N, in_channels, H, W]`; H and W multiples of 32.
    Input,
    /// 2-D convolution with a square kernel, zero padding `kernel / 2`, no groups.
    Conv {
        kernel: u32,
        stride: u32,
        bias: bool,
        init: ConvInit,
    },
    /// Batch normalisation (eps 1e-5, momentum 0.1, PyTorch's defaults).
    BatchNorm,
    /// `x * sigmoid(x)`.
    Silu,
    Relu,
    Sigmoid,
    /// Elementwise sum of two inputs of equal shape.
    Add,
    /// Concatenation of feature maps along channels.
    Concat,
    /// Nearest-neighbour upsampling by 2 in both spatial axes (ONNX Resize, nearest).
    Upsample2x,
    /// Max pooling with a square window, padding `kernel / 2`.
    MaxPool {
        kernel: u32,
        stride: u32,
    },
    /// `[N, C, H, W]` to `[N, C, H*W]` (ONNX Reshape).
    FlattenSpatial,
    /// Swaps the last two axes of `[N, A, B]` (ONNX Transpose, perm 0,2,1).
    Transpose,
    /// Batched matrix product `[N, A, B] x [N, B, C]`.
    MatMul,
    /// Multiplication by a constant (ONNX Mul).
    Scale {
        factor: f32,
    },
    /// Softmax over the last axis.
    Softmax,
    /// Reshapes its first input to the shape of its second (ONNX Shape + Reshape): turns
    /// `[N, C, H*W]` back into `[N, C, H, W]`.
    ReshapeLike,
}

/// How a conv's tensors start out before training.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvInit {
    /// PyTorch's default: weight and bias uniform in `±1/sqrt(fan_in)`.
    Default,
    /// Weight and bias zero, so a residual branch starts as the identity.
    Zeros,
    /// Default weight, constant bias (the heatmap prior).
    BiasConst(f32),
}

/// A named operation on named inputs. `channels` is the size of axis 1 of the output, or 0
/// where axis 1 counts spatial positions (attention scores).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    #[serde(flatten)]
    pub op: Op,
    pub inputs: Vec<String>,
    pub channels: u32,
}

/// Nodes in topological order (every input appears before its consumers), one input node and
/// the output nodes `[HEATMAP, BOX]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Graph {
    pub in_channels: u32,
    pub nodes: Vec<Node>,
    pub outputs: Vec<String>,
}

/// A tensor that the graph owns, with how it starts out.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: ParamInit,
    /// False for BatchNorm running statistics, which training updates without gradients.
    pub trainable: bool,
}

/// Initial values of a tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ParamInit {
    /// Uniform in `[-bound, bound]`.
    Uniform {
        bound: f32,
    },
    Const(f32),
}

impl ArchConfig {
    /// Checks every field, reporting all problems at once.
    pub fn validate(&self) -> Result<(), ArchError> {
        let mut problems = Vec::new();
        if !(1..=3).contains(&self.in_channels) {
            problems.push(format!(
                "in_channels is {}; use 1 (grey), 2 (image + template) or 3 (RGB)",
                self.in_channels
            ));
        }
        if !(1..=1000).contains(&self.num_classes) {
            problems.push(format!(
                "num_classes is {}; use 1 to 1000",
                self.num_classes
            ));
        }
        if self.input_size == 0 || self.input_size % MAX_STRIDE != 0 || self.input_size > 4096 {
            problems.push(format!(
                "input_size is {}; use a multiple of {MAX_STRIDE} up to 4096",
                self.input_size
            ));
        }
        if !(self.width.is_finite() && (0.125..=4.0).contains(&self.width)) {
            problems.push(format!("width is {}; use 0.125 to 4", self.width));
        }
        if !(self.depth.is_finite() && (0.25..=4.0).contains(&self.depth)) {
            problems.push(format!("depth is {}; use 0.25 to 4", self.depth));
        }
        for (field, v) in [
            ("fpn_width", self.fpn_width),
            ("head_width", self.head_width),
        ] {
            if !(8..=1024).contains(&v) {
                problems.push(format!("{field} is {v}; use 8 to 1024"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ArchError::Config(problems))
        }
    }

    /// Channels of the stem and the four stages.
    pub fn stage_widths(&self) -> [u32; 5] {
        BASE_WIDTHS.map(|w| {
            // Bounded by validate(): width <= 4 keeps this far below u32::MAX.
            let eighths = (f64::from(w) * self.width / 8.0).round().max(1.0);
            eighths as u32 * 8
        })
    }

    /// Residual blocks in each of the four stages.
    pub fn stage_depths(&self) -> [u32; 4] {
        BASE_DEPTHS.map(|d| (f64::from(d) * self.depth).round().max(1.0) as u32)
    }

    /// The explicit graph of this configuration, validated.
    pub fn graph(&self) -> Result<Graph, ArchError> {
        self.validate()?;
        let graph = build::expand(self);
        graph.validate()?;
        Ok(graph)
    }
}
