//! The fuzz targets' entry functions, shared by the libFuzzer harnesses in `common/fuzz` and
//! by the stable replay test `common/tests/fuzz_corpus.rs`, so each harness is written once.
//!
//! Each entry feeds arbitrary bytes to one parser of outside input and returns what the parser
//! said ([`Outcome`]); it panics only when an invariant breaks: a parser panicked, accepted
//! something it cannot round-trip, disagreed with itself, or wrote outside its folder. Bad
//! input is never a failure here. The first byte of some targets selects options (see each
//! function), so one corpus explores them all. Not an API: hidden from the docs and free to
//! change with the targets.

use std::io::{self, Read};
use std::sync::OnceLock;

use ring::digest;

use crate::delta::{self, Codec, DeltaSink, Layout};
use crate::model::{ModelState, Tensor};
use crate::onnx;

mod bundle;
mod onnx_seed;
mod seeds;

pub use bundle::{bundle_archive, bundle_manifest, ARCHIVE_LIMITS, ARCHIVE_RESIGN};
pub use seeds::{seeds, Seed};

/// Delta flag bit: recompute the trailing SHA-256, so mutated payloads reach the value checks
/// and the end of the decoder instead of stopping at the checksum.
pub const DELTA_RESEAL: u8 = 1;
/// Delta flag bits 1-2: the codec the decoder is told to expect (none, f32, f16, q8:7).
pub const DELTA_EXPECT_SHIFT: u8 = 1;
/// Delta flag bit: read the stream through a reader that returns 1 to 7 bytes per call.
pub const DELTA_TRICKLE: u8 = 8;
/// The q8 block size of the q8 delta seed and of the expected-codec option.
pub const SEED_Q8_BLOCK: u32 = 7;

/// One fuzz target of this crate: its name is its corpus folder and its harness file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Delta,
    Safetensors,
    BundleManifest,
    BundleArchive,
    Onnx,
}

impl Target {
    pub const ALL: [Target; 5] = [
        Target::Delta,
        Target::Safetensors,
        Target::BundleManifest,
        Target::BundleArchive,
        Target::Onnx,
    ];

    /// The folder name under `corpus/` and `regressions/`, and the harness name.
    pub fn name(self) -> &'static str {
        match self {
            Target::Delta => "delta_decode",
            Target::Safetensors => "safetensors_read",
            Target::BundleManifest => "bundle_manifest",
            Target::BundleArchive => "bundle_archive",
            Target::Onnx => "onnx_decode",
        }
    }

    /// Runs this target's entry function on `data`.
    pub fn run(self, data: &[u8]) -> Outcome {
        match self {
            Target::Delta => delta_decode(data),
            Target::Safetensors => safetensors_read(data),
            Target::BundleManifest => bundle_manifest(data),
            Target::BundleArchive => bundle_archive(data),
            Target::Onnx => onnx_decode(data),
        }
    }
}

/// What a parser made of the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    /// Refused: the error's variant name (`Truncated`, `ManifestMalformed`, ...) and message.
    Refused {
        kind: String,
        message: String,
    },
}

impl Outcome {
    /// Refused with error `e`, its kind read from its `Debug` form (the variant name).
    pub fn refused<E: std::fmt::Debug + std::fmt::Display>(e: E) -> Self {
        let debug = format!("{e:?}");
        let kind = debug
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .next()
            .unwrap_or_default();
        Outcome::Refused {
            kind: kind.to_string(),
            message: e.to_string(),
        }
    }

    /// Refused by the harness itself, before any parser ran.
    pub fn unusable(message: &str) -> Self {
        Outcome::Refused {
            kind: "UnusableInput".to_string(),
            message: message.to_string(),
        }
    }
}

/// The delta decoder against [`delta_base`]'s layout. Byte 0 holds flags ([`DELTA_RESEAL`],
/// the expected codec at [`DELTA_EXPECT_SHIFT`], [`DELTA_TRICKLE`]); the rest is the stream.
///
/// Checks: the [`DeltaSink`] contract (tensors in order, chunks in order covering each tensor
/// once), `decode` and `decode_to_model` agree, a short-read reader changes nothing, and an
/// accepted delta re-encodes (byte for byte with f32 and f16).
pub fn delta_decode(data: &[u8]) -> Outcome {
    let Some((&flags, stream)) = data.split_first() else {
        return Outcome::unusable("empty input (byte 0 holds the decode flags)");
    };
    let mut stream = stream.to_vec();
    if flags & DELTA_RESEAL != 0 && stream.len() >= 32 {
        let body = stream.len() - 32;
        let sum = digest::digest(&digest::SHA256, &stream[..body]);
        stream[body..].copy_from_slice(sum.as_ref());
    }
    let expected = match (flags >> DELTA_EXPECT_SHIFT) & 3 {
        0 => None,
        1 => Some(Codec::F32),
        2 => Some(Codec::F16),
        _ => Some(Codec::Q8 {
            block: SEED_Q8_BLOCK,
        }),
    };
    let (base, layout) = delta_base();
    let mut sink = CheckingSink::new(layout);
    let streamed = if flags & DELTA_TRICKLE != 0 {
        delta::decode(Trickle::new(&stream), layout, expected, &mut sink)
    } else {
        delta::decode(stream.as_slice(), layout, expected, &mut sink)
    };
    let whole = delta::decode_to_model(stream.as_slice(), layout, expected);
    match (streamed, whole) {
        (Ok(codec), Ok(model)) => {
            sink.assert_complete();
            assert_eq!(
                sink.bits(),
                bits(&model),
                "decode fed its sink other values than decode_to_model returned"
            );
            assert_eq!(
                base.iter().map(|(n, t)| (n, t.shape())).collect::<Vec<_>>(),
                model
                    .iter()
                    .map(|(n, t)| (n, t.shape()))
                    .collect::<Vec<_>>(),
                "decode_to_model returned another layout than the base's"
            );
            assert_reencodes(&model, codec, layout, &stream);
            Outcome::Accepted
        }
        (Err(a), Err(b)) => {
            assert_eq!(
                a.to_string(),
                b.to_string(),
                "the same stream gave two errors (reader or sink changed the result)"
            );
            Outcome::refused(a)
        }
        (a, b) => panic!(
            "decode and decode_to_model disagree on one stream: {:?} vs {:?}",
            a.map(|_| ()),
            b.map(|_| ())
        ),
    }
}

/// The safetensors reader. Checks: an accepted file writes back and reads again as the same
/// model, metadata and content hash.
pub fn safetensors_read(data: &[u8]) -> Outcome {
    let (model, metadata) = match ModelState::from_safetensors_bytes(data) {
        Ok(read) => read,
        Err(e) => return Outcome::refused(e),
    };
    let bytes = model
        .to_safetensors_bytes(&metadata)
        .unwrap_or_else(|e| panic!("an accepted model does not write back: {e}"));
    let (again, meta_again) = ModelState::from_safetensors_bytes(&bytes)
        .unwrap_or_else(|e| panic!("a model we wrote does not read back: {e}"));
    assert_eq!(bits(&model), bits(&again), "values changed on a round trip");
    assert_eq!(metadata, meta_again, "metadata changed on a round trip");
    assert_eq!(model.content_hash(), again.content_hash());
    Outcome::Accepted
}

/// The ONNX decoder (`onnx::decode`, used to inspect exported files). Checks: a decoded
/// model re-encodes to bytes that decode and re-encode to the same bytes.
pub fn onnx_decode(data: &[u8]) -> Outcome {
    use prost::Message;
    let model = match onnx::decode(data) {
        Ok(m) => m,
        Err(e) => return Outcome::refused(e),
    };
    let bytes = model.encode_to_vec();
    let again = onnx::decode(&bytes)
        .unwrap_or_else(|e| panic!("an ONNX model we encoded does not decode: {e}"));
    assert!(
        again.encode_to_vec() == bytes,
        "re-encoding a decoded ONNX model is not stable"
    );
    Outcome::Accepted
}

/// Panics unless `model`, decoded from `stream` with `codec`, encodes again: to the same bytes
/// for the lossless codecs, to a stream that decodes for q8 (whose scales may shrink).
fn assert_reencodes(model: &ModelState, codec: Codec, layout: &Layout, stream: &[u8]) {
    let mut out = Vec::new();
    let n = delta::encode(model, codec, &mut out)
        .unwrap_or_else(|e| panic!("a delta the decoder accepted does not re-encode: {e}"));
    assert_eq!(n, out.len() as u64, "encode miscounted its bytes");
    assert_eq!(n, delta::encoded_len(layout, codec), "encoded_len is wrong");
    match codec {
        Codec::F32 | Codec::F16 => assert!(
            out == stream,
            "re-encoding an accepted {codec} delta changed its bytes"
        ),
        Codec::Q8 { .. } => {
            if let Err(e) = delta::decode_to_model(out.as_slice(), layout, Some(codec)) {
                panic!("a re-encoded q8 delta does not decode: {e}");
            }
        }
    }
}

/// Every value's bits, per tensor in canonical order (`-0.0` and `0.0` differ).
fn bits(model: &ModelState) -> Vec<(String, Vec<u32>)> {
    model
        .iter()
        .map(|(n, t)| {
            (
                n.to_string(),
                t.data().iter().map(|v| v.to_bits()).collect(),
            )
        })
        .collect()
}

/// A [`DeltaSink`] that asserts the documented call order and keeps the values.
struct CheckingSink<'a> {
    layout: Vec<(&'a str, &'a [usize])>,
    /// Values per tensor begun so far.
    got: Vec<Vec<f32>>,
}

/// At most this many values per `DeltaSink::values` call, as `DeltaSink` documents.
const MAX_CHUNK_VALUES: usize = 1 << 16;

impl<'a> CheckingSink<'a> {
    fn new(layout: &'a Layout) -> Self {
        Self {
            layout: layout.iter().collect(),
            got: Vec::new(),
        }
    }

    fn numel(shape: &[usize]) -> usize {
        shape.iter().product()
    }

    fn assert_complete(&self) {
        assert_eq!(
            self.got.len(),
            self.layout.len(),
            "a tensor was never begun"
        );
        for ((name, shape), values) in self.layout.iter().zip(&self.got) {
            assert_eq!(
                values.len(),
                Self::numel(shape),
                "tensor '{name}' incomplete"
            );
        }
    }

    fn bits(&self) -> Vec<(String, Vec<u32>)> {
        self.layout
            .iter()
            .zip(&self.got)
            .map(|((n, _), v)| (n.to_string(), v.iter().map(|x| x.to_bits()).collect()))
            .collect()
    }
}

impl DeltaSink for CheckingSink<'_> {
    fn tensor_begin(&mut self, name: &str, shape: &[usize]) {
        if let Some(prev) = self.got.len().checked_sub(1) {
            let (prev_name, prev_shape) = self.layout[prev];
            assert_eq!(
                self.got[prev].len(),
                Self::numel(prev_shape),
                "tensor '{name}' began before '{prev_name}' was complete"
            );
        }
        let Some(&(want, want_shape)) = self.layout.get(self.got.len()) else {
            panic!("tensor '{name}' began after the last tensor of the layout");
        };
        assert_eq!((name, shape), (want, want_shape), "tensors out of order");
        self.got.push(Vec::new());
    }

    fn values(&mut self, name: &str, offset: usize, values: &[f32]) {
        let Some(current) = self.got.len().checked_sub(1) else {
            panic!("values of '{name}' before any tensor began");
        };
        let (want, shape) = self.layout[current];
        let got = &mut self.got[current];
        assert_eq!(name, want, "values for a tensor other than the current one");
        assert_eq!(offset, got.len(), "chunks of '{name}' out of order");
        assert!(
            !values.is_empty() && values.len() <= MAX_CHUNK_VALUES,
            "a chunk of {} values",
            values.len()
        );
        assert!(
            offset + values.len() <= Self::numel(shape),
            "chunks overrun tensor '{name}'"
        );
        got.extend_from_slice(values);
    }
}

/// A reader that returns 1 to 7 bytes per call, to exercise the decoder's short-read paths.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl<'a> Trickle<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, step: 0 }
    }
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.step = self.step % 7 + 1;
        let n = self.step.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// The fixed base model (all zeros) and its layout that every delta input is decoded against:
/// a matrix, a vector, an empty tensor and a scalar, so q8 blocks end mid-tensor.
pub fn delta_base() -> (&'static ModelState, &'static Layout) {
    static BASE: OnceLock<(ModelState, Layout)> = OnceLock::new();
    let (model, layout) = BASE.get_or_init(|| {
        let mut m = ModelState::new();
        let tensors: [(&str, Vec<usize>); 4] = [
            ("backbone.conv.weight", vec![3, 5]),
            ("backbone.conv.bias", vec![4]),
            ("head.empty", vec![0, 2]),
            ("head.scale", vec![]),
        ];
        for (name, shape) in tensors {
            let t = Tensor::zeros(shape).expect("fixed shapes are small");
            m.insert(name, t).expect("fixed names are unique");
        }
        let layout = Layout::of(&m);
        (m, layout)
    });
    (model, layout)
}
