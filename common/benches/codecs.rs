//! Benchmark of the delta codecs: encode and decode throughput (GB/s of f32 delta data) and
//! encoded size per codec on the 10M-parameter workload model, median of a few runs.
//!
//! Run with `cargo bench -p fedinspect-common --bench codecs`. Single-threaded; the model is
//! the `10M` CNN of `bench/WORKLOAD.md` (P = 10,116,810) filled with N(0, 1e-3) values.

use std::hint::black_box;
use std::time::Instant;

use fedinspect_common::delta::{
    decode, decode_to_model, encode, encoded_len, roundtrip, Codec, DeltaSink, Layout,
};
use fedinspect_common::{ModelState, Tensor};
use ring::digest;

const REPS: usize = 7;

fn main() {
    let delta = workload_model(80, 1920, 1e-3);
    let params = delta.num_params();
    let f32_bytes = 4.0 * params as f64;
    let layout = Layout::of(&delta);
    println!(
        "delta codecs, {params} parameters ({:.1} MB as f32), median of {REPS} runs, 1 thread",
        f32_bytes / 1e6
    );
    println!(
        "{:<8} {:>11} {:>6} {:>7} {:>7} {:>9} {:>8} {:>10} {:>10}",
        "codec",
        "bytes",
        "ratio",
        "encode",
        "decode",
        "+fedavg",
        "→model",
        "roundtrip",
        "max |err|"
    );
    let mut out = Vec::with_capacity(encoded_len(&layout, Codec::F32) as usize);
    for codec in [Codec::F32, Codec::F16, Codec::q8()] {
        print_row(codec, &delta, &layout, &mut out);
    }
    let sha_s = median(|| {
        black_box(digest::digest(&digest::SHA256, &out));
    });
    println!(
        "GB/s of f32 delta data. decode: to a sink that drops the values; +fedavg: to a sink that\n\
         accumulates acc += w·delta in place; →model: decode_to_model; roundtrip: what the client\n\
         keeps for error feedback."
    );
    println!(
        "reference: SHA-256 alone hashes {:.2} GB/s (every encoded byte is hashed once)",
        out.len() as f64 / sha_s / 1e9
    );
}

/// Times every operation of `codec` on `delta` and prints one table row; leaves the encoded
/// stream in `out`.
fn print_row(codec: Codec, delta: &ModelState, layout: &Layout, out: &mut Vec<u8>) {
    let params = delta.num_params();
    let f32_bytes = 4.0 * params as f64;
    let encode_s = median(|| {
        out.clear();
        encode(delta, codec, &mut *out).expect("encode");
    });
    let null_s = median(|| {
        decode(out.as_slice(), layout, Some(codec), &mut Discard).expect("decode");
    });
    let mut sink = Accumulate::new(params);
    let sink_s = median(|| {
        sink.restart();
        decode(out.as_slice(), layout, Some(codec), &mut sink).expect("decode");
    });
    black_box(sink.acc[params / 2]);
    let model_s = median(|| {
        black_box(decode_to_model(out.as_slice(), layout, Some(codec)).expect("decode"));
    });
    let roundtrip_s = median(|| {
        black_box(roundtrip(codec, delta).expect("roundtrip"));
    });
    let decoded = decode_to_model(out.as_slice(), layout, Some(codec)).expect("decode");
    let gbps = |s: f64| format!("{:.2}", f32_bytes / s / 1e9);
    println!(
        "{:<8} {:>11} {:>6.3} {:>7} {:>7} {:>9} {:>8} {:>10} {:>10.3e}",
        codec.to_string(),
        out.len(),
        out.len() as f64 / f32_bytes,
        gbps(encode_s),
        gbps(null_s),
        gbps(sink_s),
        gbps(model_s),
        gbps(roundtrip_s),
        max_abs_error(delta, &decoded)
    );
}

/// The workload CNN with `(c, h)` channels and hidden width, values ~ N(0, sigma²).
fn workload_model(c: usize, h: usize, sigma: f64) -> ModelState {
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("conv1.weight".into(), vec![c, 3, 3, 3]),
        ("conv1.bias".into(), vec![c]),
    ];
    let chans = [(c, 2 * c), (2 * c, 4 * c), (4 * c, 4 * c), (4 * c, 8 * c)];
    for (i, (cin, cout)) in chans.into_iter().enumerate() {
        let k = i + 2;
        shapes.push((format!("conv{k}.weight"), vec![cout, cin, 3, 3]));
        shapes.push((format!("bn{k}.weight"), vec![cout]));
        shapes.push((format!("bn{k}.bias"), vec![cout]));
    }
    for (name, shape) in [
        ("fc1", vec![h, 32 * c]),
        ("fc2", vec![h / 2, h]),
        ("fc3", vec![10, h / 2]),
    ] {
        shapes.push((format!("{name}.bias"), vec![shape[0]]));
        shapes.push((format!("{name}.weight"), shape));
    }
    let mut rng = Normal::new(0x5eed);
    let tensors = shapes.into_iter().map(|(name, shape)| {
        let n: usize = shape.iter().product();
        let data = (0..n).map(|_| (rng.sample() * sigma) as f32).collect();
        (name, Tensor::new(shape, data).expect("valid shape"))
    });
    ModelState::from_tensors(tensors).expect("unique names")
}

/// Seconds of the median run of `f`, after one warm-up run.
fn median(mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..REPS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[REPS / 2]
}

fn max_abs_error(a: &ModelState, b: &ModelState) -> f32 {
    a.iter()
        .zip(b.iter())
        .flat_map(|((_, x), (_, y))| x.data().iter().zip(y.data()).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

/// A sink that only looks at each chunk, to time the decoder itself.
struct Discard;

impl DeltaSink for Discard {
    fn values(&mut self, _name: &str, _offset: usize, values: &[f32]) {
        black_box(values);
    }
}

/// What a FedAvg coordinator does with a streamed delta: `acc += weight · delta`, in place.
struct Accumulate {
    acc: Vec<f32>,
    start: usize,
    next: usize,
}

impl Accumulate {
    fn new(params: usize) -> Self {
        Self {
            acc: vec![0.0; params],
            start: 0,
            next: 0,
        }
    }

    fn restart(&mut self) {
        self.start = 0;
        self.next = 0;
    }
}

impl DeltaSink for Accumulate {
    fn tensor_begin(&mut self, _name: &str, shape: &[usize]) {
        self.start = self.next;
        self.next += shape.iter().product::<usize>();
    }

    fn values(&mut self, _name: &str, offset: usize, values: &[f32]) {
        let acc = &mut self.acc[self.start + offset..][..values.len()];
        for (a, &v) in acc.iter_mut().zip(values) {
            *a += 0.25 * v;
        }
    }
}

/// Standard normal samples: SplitMix64 uniforms through Box-Muller.
struct Normal {
    state: u64,
    spare: Option<f64>,
}

impl Normal {
    fn new(seed: u64) -> Self {
        Self {
            state: seed,
            spare: None,
        }
    }

    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn sample(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let u = 1.0 - self.uniform(); // in (0, 1]: ln is finite
        let r = (-2.0 * u.ln()).sqrt();
        let theta = std::f64::consts::TAU * self.uniform();
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }
}
