//! Expansion of an [`ArchConfig`] into its [`Graph`]: the one place that decides node names,
//! and therefore parameter names.

use super::{
    ArchConfig, ConvInit, Graph, Node, Op, BOX, BOX_CHANNELS, HEATMAP, HEATMAP_PRIOR_BIAS, INPUT,
};

/// Appends nodes and hands back the name of the node it added, so that the expansion below
/// reads like the forward pass it describes.
struct Builder {
    nodes: Vec<Node>,
}

impl Builder {
    fn add(&mut self, name: String, op: Op, inputs: &[&str], channels: u32) -> String {
        self.nodes.push(Node {
            name: name.clone(),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            channels,
        });
        name
    }

    fn conv(&mut self, name: String, x: &str, out: u32, kernel: u32, init: ConvInit) -> String {
        let op = Op::Conv {
            kernel,
            stride: 1,
            bias: true,
            init,
        };
        self.add(name, op, &[x], out)
    }

    /// `<unit>.conv` (no bias), `<unit>.bn`, `<unit>.act` (SiLU).
    fn conv_bn_act(&mut self, unit: &str, x: &str, out: u32, stride: u32) -> String {
        let op = Op::Conv {
            kernel: 3,
            stride,
            bias: false,
            init: ConvInit::Default,
        };
        let c = self.add(format!("{unit}.conv"), op, &[x], out);
        let b = self.add(format!("{unit}.bn"), Op::BatchNorm, &[&c], out);
        self.add(format!("{unit}.act"), Op::Silu, &[&b], out)
    }

    /// Two conv-BN-SiLU units plus the block input.
    fn residual_block(&mut self, block: &str, x: &str, ch: u32) -> String {
        let h = self.conv_bn_act(&format!("{block}.cv1"), x, ch, 1);
        let h = self.conv_bn_act(&format!("{block}.cv2"), &h, ch, 1);
        self.add(format!("{block}.add"), Op::Add, &[x, &h], ch)
    }

    /// Single-head self-attention over the positions of `x`, added to `x`.
    fn attention(&mut self, p: &str, x: &str, ch: u32) -> String {
        let d = (ch / 4).max(8);
        let q = self.conv(format!("{p}.q"), x, d, 1, ConvInit::Default);
        let k = self.conv(format!("{p}.k"), x, d, 1, ConvInit::Default);
        let v = self.conv(format!("{p}.v"), x, ch, 1, ConvInit::Default);
        let qf = self.add(format!("{p}.q_flat"), Op::FlattenSpatial, &[&q], d);
        let qt = self.add(format!("{p}.q_t"), Op::Transpose, &[&qf], 0);
        let kf = self.add(format!("{p}.k_flat"), Op::FlattenSpatial, &[&k], d);
        let s = self.add(format!("{p}.scores"), Op::MatMul, &[&qt, &kf], 0);
        let factor = 1.0 / (d as f32).sqrt();
        let s = self.add(format!("{p}.scaled"), Op::Scale { factor }, &[&s], 0);
        let a = self.add(format!("{p}.weights"), Op::Softmax, &[&s], 0);
        let at = self.add(format!("{p}.weights_t"), Op::Transpose, &[&a], 0);
        let vf = self.add(format!("{p}.v_flat"), Op::FlattenSpatial, &[&v], ch);
        let m = self.add(format!("{p}.mixed"), Op::MatMul, &[&vf, &at], ch);
        let m = self.add(format!("{p}.unflat"), Op::ReshapeLike, &[&m, x], ch);
        let o = self.conv(format!("{p}.proj"), &m, ch, 1, ConvInit::Zeros);
        self.add(format!("{p}.add"), Op::Add, &[x, &o], ch)
    }

    /// 3x3 conv + SiLU, then a 1x1 conv to `out` channels named `name`.
    fn head_branch(&mut self, name: &str, x: &str, hidden: u32, out: u32, init: ConvInit) {
        let h = self.conv(format!("{name}_hidden"), x, hidden, 3, ConvInit::Default);
        let h = self.add(format!("{name}_hidden_act"), Op::Silu, &[&h], hidden);
        self.conv(name.to_string(), &h, out, 1, init);
    }
}

pub(super) fn expand(cfg: &ArchConfig) -> Graph {
    let widths = cfg.stage_widths();
    let depths = cfg.stage_depths();
    let mut b = Builder { nodes: Vec::new() };

    let input = b.add(INPUT.to_string(), Op::Input, &[], cfg.in_channels);
    let mut x = b.conv_bn_act("backbone.stem", &input, widths[0], 2);
    let mut stage_outputs = Vec::with_capacity(4);
    for (i, (&ch, &n)) in widths[1..].iter().zip(&depths).enumerate() {
        let stage = format!("backbone.s{}", i + 1);
        x = b.conv_bn_act(&format!("{stage}.down"), &x, ch, 2);
        for j in 0..n {
            x = b.residual_block(&format!("{stage}.b{j}"), &x, ch);
        }
        stage_outputs.push(x.clone());
    }
    if cfg.attention {
        let last = stage_outputs.len() - 1;
        stage_outputs[last] = b.attention("backbone.attn", &stage_outputs[last], widths[4]);
    }

    let f = cfg.fpn_width;
    let mut p = b.conv(
        "neck.lateral4".into(),
        &stage_outputs[3],
        f,
        1,
        ConvInit::Default,
    );
    for i in (1..=3).rev() {
        let up = b.add(format!("neck.up{}", i + 1), Op::Upsample2x, &[&p], f);
        let lat = b.conv(
            format!("neck.lateral{i}"),
            &stage_outputs[i - 1],
            f,
            1,
            ConvInit::Default,
        );
        p = b.add(format!("neck.merge{i}"), Op::Add, &[&lat, &up], f);
    }

    let prior = ConvInit::BiasConst(HEATMAP_PRIOR_BIAS);
    b.head_branch(HEATMAP, &p, cfg.head_width, cfg.num_classes, prior);
    b.head_branch(BOX, &p, cfg.head_width, BOX_CHANNELS, ConvInit::Default);

    Graph {
        in_channels: cfg.in_channels,
        nodes: b.nodes,
        outputs: vec![HEATMAP.to_string(), BOX.to_string()],
    }
}
