//! Unit tests of deltas and their codecs: hand-checked cases, the documented error bounds,
//! pinned wire bytes, encoded sizes, and streaming in small pieces and bounded chunks.

use std::io;

use ring::digest;

use super::test_util::*;
use super::*;

fn sample() -> ModelState {
    model(&[
        ("conv.weight", &[4, 3, 3, 3], noise(108, 1e-3, 1)),
        ("conv.bias", &[4], vec![0.5, -0.25, 0.0, 1e-3]),
        ("fc.weight", &[10, 300], noise(3000, 1e-2, 2)),
        ("scalar", &[], vec![-3.0]),
        ("empty", &[0, 5], vec![]),
    ])
}

// ---- compute_delta / apply_delta ----

#[test]
fn compute_delta_is_local_minus_base_and_apply_restores_local() {
    let base = model(&[("w", &[2, 2], vec![1.0, 0.5, -2.0, 0.0])]);
    let local = model(&[("w", &[2, 2], vec![1.5, 2.0, -2.25, 0.125])]);
    let delta = compute_delta(&local, &base).unwrap();
    assert_eq!(delta.get("w").unwrap().data(), &[0.5, 1.5, -0.25, 0.125]);
    assert_eq!(apply_delta(&base, &delta).unwrap(), local);
}

#[test]
fn compute_and_apply_refuse_layout_differences() {
    let base = model(&[("a", &[2], vec![0.0; 2]), ("b", &[3], vec![0.0; 3])]);
    let missing = model(&[("a", &[2], vec![0.0; 2])]);
    let extra = model(&[
        ("a", &[2], vec![0.0; 2]),
        ("b", &[3], vec![0.0; 3]),
        ("c", &[1], vec![0.0]),
    ]);
    let reshaped = model(&[("a", &[2], vec![0.0; 2]), ("b", &[1, 3], vec![0.0; 3])]);
    assert!(matches!(
        compute_delta(&missing, &base),
        Err(DeltaError::MissingTensor { ref name }) if name == "b"
    ));
    assert!(matches!(
        compute_delta(&extra, &base),
        Err(DeltaError::UnexpectedTensor { ref name }) if name == "c"
    ));
    assert!(matches!(
        compute_delta(&reshaped, &base),
        Err(DeltaError::ShapeMismatch { ref name, ref expected, ref found })
            if name == "b" && expected == &[3] && found == &[1, 3]
    ));
    assert!(matches!(
        apply_delta(&base, &missing),
        Err(DeltaError::MissingTensor { .. })
    ));
    assert!(matches!(
        apply_delta(&base, &extra),
        Err(DeltaError::UnexpectedTensor { .. })
    ));
    assert!(matches!(
        apply_delta(&base, &reshaped),
        Err(DeltaError::ShapeMismatch { .. })
    ));
}

#[test]
fn compute_and_apply_refuse_non_finite_results() {
    let base = model(&[("w", &[3], vec![0.0, -3e38, 1.0])]);
    let local = model(&[("w", &[3], vec![0.0, 3e38, 1.0])]);
    assert!(matches!(
        compute_delta(&local, &base),
        Err(DeltaError::NonFinite { ref name, index: 1 }) if name == "w"
    ));
    let nan = model(&[("w", &[3], vec![0.0, 0.0, f32::NAN])]);
    assert!(matches!(
        apply_delta(&base, &nan),
        Err(DeltaError::NonFinite { index: 2, .. })
    ));
}

// ---- codecs within their documented bounds ----

#[test]
fn f32_is_exact_bit_for_bit() {
    let special = vec![
        0.0,
        -0.0,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE / 8.0,
        f32::from_bits(1),
        f32::MAX,
        f32::MIN,
        1e-3,
        -65505.0,
    ];
    let m = model(&[
        ("s", &[9], special),
        ("n", &[70_001], noise(70_001, 1.0, 3)),
    ]);
    let back = decode_vec(&encode_vec(&m, Codec::F32), &m, Some(Codec::F32)).unwrap();
    assert_eq!(bits(&back), bits(&m));
}

#[test]
fn f16_error_is_within_the_documented_bound() {
    let mut values = Vec::new();
    for e in -40..=15 {
        for m in [1.0f32, 1.0004883, 1.3333, 1.5, 1.99951, 1.9999] {
            let v = m * 2f32.powi(e);
            if v <= 65504.0 {
                values.extend([v, -v]);
            }
        }
    }
    values.extend([65504.0, -65504.0, 0.0, -0.0, 2f32.powi(-14), 2f32.powi(-25)]);
    values.extend(noise(50_000, 1e-3, 4));
    let m = model(&[("v", &[values.len()], values)]);
    let back = decode_vec(&encode_vec(&m, Codec::F16), &m, None).unwrap();
    for (&v, &d) in m
        .get("v")
        .unwrap()
        .data()
        .iter()
        .zip(back.get("v").unwrap().data())
    {
        assert!(f16_within_bound(v, d), "{v} decoded as {d}");
    }
    // 2^-40 is far below f16's smallest subnormal (2^-24) and flushes to zero.
    assert_eq!(back.get("v").unwrap().data()[..2], [0.0, -0.0]);
}

#[test]
fn f16_refuses_values_outside_its_range_instead_of_saturating() {
    let ok = model(&[("w", &[2], vec![65504.0, -65504.0])]);
    let back = decode_vec(&encode_vec(&ok, Codec::F16), &ok, None).unwrap();
    assert_eq!(back, ok);
    let big = model(&[("w", &[3], vec![1.0, -65505.0, 1e9])]);
    let e = encode(&big, Codec::F16, io::sink()).unwrap_err();
    assert!(
        matches!(e, DeltaError::F16OutOfRange { ref name, index: 1, value } if name == "w" && value == -65505.0),
        "{e}"
    );
    assert!(e.to_string().contains("f32 codec"), "{e}");
    assert!(matches!(
        roundtrip(Codec::F16, &big),
        Err(DeltaError::F16OutOfRange { index: 1, .. })
    ));
}

#[test]
fn q8_error_is_within_the_documented_bound() {
    let mut wide = noise(1000, 1.0, 5);
    for (i, v) in wide.iter_mut().enumerate() {
        *v *= 10f32.powi((i % 9) as i32 - 4);
    }
    let tiny: Vec<f32> = (0..40)
        .map(|i| f32::from_bits(i * 3) * if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    let huge: Vec<f32> = (0..40).map(|i| f32::MAX / (1.0 + i as f32 / 7.0)).collect();
    let m = model(&[
        ("a", &[1000], wide),
        ("b", &[33_333], noise(33_333, 1e-3, 6)),
        ("c", &[40], tiny),
        ("d", &[40], huge),
        ("z", &[300], vec![0.0; 300]),
    ]);
    for block in [1usize, 7, 256, 4096, 65_536] {
        let codec = Codec::Q8 {
            block: block as u32,
        };
        let back = decode_vec(&encode_vec(&m, codec), &m, Some(codec)).unwrap();
        assert_q8_within_bound(&m, &back, block);
        assert!(back
            .get("z")
            .unwrap()
            .data()
            .iter()
            .all(|&v| v.to_bits() == 0));
        assert!(back.get("d").unwrap().data().iter().all(|v| v.is_finite()));
    }
}

#[test]
fn roundtrip_is_what_the_decoder_sees_bit_for_bit() {
    let m = sample();
    for codec in ALL_CODECS {
        let decoded = decode_vec(&encode_vec(&m, codec), &m, Some(codec)).unwrap();
        assert_eq!(
            bits(&roundtrip(codec, &m).unwrap()),
            bits(&decoded),
            "{codec}"
        );
    }
    assert_eq!(bits(&roundtrip(Codec::F32, &m).unwrap()), bits(&m));
}

#[test]
fn encoded_sizes_match_the_codec() {
    let n = 1_000_000;
    let m = model(&[("w", &[1000, 1000], noise(n, 1e-3, 7))]);
    // magic, version, codec, count; one tensor "w" of rank 2; q8 adds its block size.
    let header = 8 + 2 + 1 + 4 + (2 + 1 + 1 + 16);
    let len = |codec| {
        let bytes = encode_vec(&m, codec);
        assert_eq!(bytes.len() as u64, encoded_len(&Layout::of(&m), codec));
        bytes.len()
    };
    let f32_len = len(Codec::F32);
    assert_eq!(f32_len, header + 4 * n + 32);
    assert_eq!(len(Codec::F16), header + 2 * n + 32);
    assert_eq!(len(Codec::q8()), header + 4 + n + 4 * n.div_ceil(256) + 32);
    assert_eq!(
        len(Codec::Q8 { block: 64 }),
        header + 4 + n + 4 * n.div_ceil(64) + 32
    );
    let ratio = |c| len(c) as f64 / f32_len as f64;
    assert!((ratio(Codec::F16) - 0.5).abs() < 1e-3);
    assert!((ratio(Codec::q8()) - (0.25 + 1.0 / 256.0)).abs() < 1e-3);
    assert_eq!(
        encoded_len(&Layout::of(&sample()), Codec::F16),
        encode_vec(&sample(), Codec::F16).len() as u64
    );
}

// ---- wire format ----

#[test]
fn wire_bytes_are_pinned() {
    // f32: hand-written from the format table in the module docs.
    let m = model(&[("b", &[1], vec![-2.0]), ("a", &[2, 1], vec![1.0, 0.5])]);
    let mut expected = b"FIDELTA\0".to_vec();
    expected.extend([1, 0, 1, 2, 0, 0, 0]); // version 1, codec f32, 2 tensors
    expected.extend([
        1, 0, b'a', 2, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0,
    ]);
    expected.extend([1, 0, b'b', 1, 1, 0, 0, 0, 0, 0, 0, 0]);
    expected.extend([0, 0, 0x80, 0x3f, 0, 0, 0, 0x3f, 0, 0, 0, 0xc0]);
    let sum = digest::digest(&digest::SHA256, &expected);
    expected.extend_from_slice(sum.as_ref());
    assert_eq!(encode_vec(&m, Codec::F32), expected);

    // q8 with block 2: a = [1.0, -0.5 | 0.25], codes 127, round(-63.5) = -64 (ties to even), 127.
    let m = model(&[("a", &[3], vec![1.0, -0.5, 0.25])]);
    let mut expected = b"FIDELTA\0".to_vec();
    expected.extend([1, 0, 3, 2, 0, 0, 0, 1, 0, 0, 0]); // version, q8, block 2, 1 tensor
    expected.extend([1, 0, b'a', 1, 3, 0, 0, 0, 0, 0, 0, 0]);
    expected.extend([0, 0, 0x80, 0x3f, 127, (-64i8) as u8, 0, 0, 0x80, 0x3e, 127]);
    let sum = digest::digest(&digest::SHA256, &expected);
    expected.extend_from_slice(sum.as_ref());
    assert_eq!(encode_vec(&m, Codec::Q8 { block: 2 }), expected);
    let back = decode_vec(&expected, &m, None).unwrap();
    assert_eq!(back.get("a").unwrap().data(), &[1.0, -64.0 / 127.0, 0.25]);

    // f16: 1.0 = 0x3c00, -2.0 = 0xc000.
    let m = model(&[("h", &[2], vec![1.0, -2.0])]);
    let bytes = encode_vec(&m, Codec::F16);
    assert_eq!(bytes[10], 2);
    assert_eq!(
        bytes[bytes.len() - 36..bytes.len() - 32],
        [0x00, 0x3c, 0x00, 0xc0]
    );
}

#[test]
fn streaming_one_to_seven_bytes_at_a_time_gives_the_same_result() {
    let m = model(&[
        ("big", &[70_000], noise(70_000, 1e-3, 8)),
        ("small", &[3], vec![1.0, 2.0, 3.0]),
    ]);
    for codec in ALL_CODECS {
        let bytes = encode_vec(&m, codec);
        let mut w = TrickleWriter {
            out: Vec::new(),
            step: 0,
        };
        encode(&m, codec, &mut w).unwrap();
        assert_eq!(w.out, bytes, "{codec}");
        let direct = decode_vec(&bytes, &m, None).unwrap();
        let slow = decode_to_model(
            Trickle {
                data: &bytes,
                step: 3,
            },
            &Layout::of(&m),
            None,
        )
        .unwrap();
        assert_eq!(bits(&slow), bits(&direct), "{codec}");
    }
}

#[derive(Default)]
struct Recorder {
    events: Vec<(String, usize, usize)>,
    sum: f64,
}

impl DeltaSink for Recorder {
    fn tensor_begin(&mut self, name: &str, shape: &[usize]) {
        self.events.push((format!("begin {name}"), shape.len(), 0));
    }

    fn values(&mut self, name: &str, offset: usize, values: &[f32]) {
        self.events.push((name.to_string(), offset, values.len()));
        self.sum += values.iter().map(|&v| f64::from(v)).sum::<f64>();
    }
}

#[test]
fn sink_gets_each_tensor_in_order_in_bounded_contiguous_chunks() {
    let m = model(&[
        ("a", &[150_000], noise(150_000, 1.0, 9)),
        ("b", &[2, 2], vec![1.0; 4]),
        ("c", &[0], vec![]),
    ]);
    for codec in [Codec::F32, Codec::Q8 { block: 1000 }] {
        let mut rec = Recorder::default();
        let found = decode(
            encode_vec(&m, codec).as_slice(),
            &Layout::of(&m),
            None,
            &mut rec,
        )
        .unwrap();
        assert_eq!(found, codec);
        let chunk = if codec == Codec::F32 { 65_536 } else { 65_000 };
        let mut want = vec![("begin a".to_string(), 1, 0)];
        for off in (0..150_000).step_by(chunk) {
            want.push(("a".into(), off, chunk.min(150_000 - off)));
        }
        want.extend([
            ("begin b".into(), 2, 0),
            ("b".into(), 0, 4),
            ("begin c".into(), 1, 0),
        ]);
        assert_eq!(rec.events, want, "{codec}");
    }
}

#[test]
fn codec_names_parse_and_print() {
    for (s, c) in [
        ("f32", Codec::F32),
        ("f16", Codec::F16),
        ("q8", Codec::Q8 { block: 256 }),
        ("q8:64", Codec::Q8 { block: 64 }),
    ] {
        assert_eq!(s.parse::<Codec>().unwrap(), c);
        assert_eq!(c.to_string().parse::<Codec>().unwrap(), c);
    }
    assert_eq!(Codec::q8().to_string(), "q8:256");
}
