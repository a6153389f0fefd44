//! One crafted bad input per [`DeltaError`] variant, each checked with `matches!`, and a check
//! that every message is lowercase, unpunctuated at the end and says what to do.

use std::io::{self, Read};

use super::codec::Codec;
use super::test_util::{decode_vec, encode_vec, model, reseal, ALL_CODECS};
use super::*;

/// Two tensors; with q8 block 2, tensor `a` is two blocks: [1.0, -0.5] and [0.25].
fn small() -> ModelState {
    model(&[
        ("a", &[3], vec![1.0, -0.5, 0.25]),
        ("b", &[2, 2], vec![2.0; 4]),
    ])
}

const Q8_2: Codec = Codec::Q8 { block: 2 };

/// Offset of the first payload byte of `small()`.
fn payload_start(codec: Codec) -> usize {
    let prefix = if matches!(codec, Codec::Q8 { .. }) {
        19
    } else {
        15
    };
    prefix + (2 + 1 + 1 + 8) + (2 + 1 + 1 + 16)
}

/// `small()` encoded with `codec`, `patch` written at payload offset `at`, checksum redone.
fn tampered(codec: Codec, at: usize, patch: &[u8]) -> Result<ModelState, DeltaError> {
    let mut bytes = encode_vec(&small(), codec);
    let start = payload_start(codec) + at;
    bytes[start..start + patch.len()].copy_from_slice(patch);
    reseal(&mut bytes);
    decode_vec(&bytes, &small(), None)
}

/// A stream prefix: magic, version 1, codec id, optional block, count, then tensor headers.
fn header(codec: u8, block: Option<u32>, count: u32, tensors: &[(&[u8], &[u64])]) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend(1u16.to_le_bytes());
    h.push(codec);
    if let Some(b) = block {
        h.extend(b.to_le_bytes());
    }
    h.extend(count.to_le_bytes());
    for (name, dims) in tensors {
        h.extend((name.len() as u16).to_le_bytes());
        h.extend_from_slice(name);
        h.push(dims.len() as u8);
        for d in *dims {
            h.extend(d.to_le_bytes());
        }
    }
    h
}

#[test]
fn bad_magic() {
    let mut bytes = encode_vec(&small(), Codec::F32);
    bytes[0] = b'P';
    assert!(matches!(
        decode_vec(&bytes, &small(), None),
        Err(DeltaError::BadMagic)
    ));
    assert!(matches!(
        decode_vec(b"PK\x03\x04 a zip file, not a delta", &small(), None),
        Err(DeltaError::BadMagic)
    ));
}

#[test]
fn unsupported_version() {
    let mut bytes = encode_vec(&small(), Codec::F32);
    bytes[8] = 2;
    assert!(matches!(
        decode_vec(&bytes, &small(), None),
        Err(DeltaError::UnsupportedVersion {
            found: 2,
            supported: 1
        })
    ));
}

#[test]
fn unknown_codec() {
    let mut bytes = encode_vec(&small(), Codec::F32);
    bytes[10] = 9;
    assert!(matches!(
        decode_vec(&bytes, &small(), None),
        Err(DeltaError::UnknownCodec(9))
    ));
}

#[test]
fn codec_other_than_expected() {
    let f16 = encode_vec(&small(), Codec::F16);
    assert!(matches!(
        decode_vec(&f16, &small(), Some(Codec::q8())),
        Err(DeltaError::CodecMismatch {
            expected: Codec::Q8 { block: 256 },
            found: Codec::F16
        })
    ));
    let q8 = encode_vec(&small(), Codec::Q8 { block: 128 });
    assert!(matches!(
        decode_vec(&q8, &small(), Some(Codec::q8())),
        Err(DeltaError::CodecMismatch {
            found: Codec::Q8 { block: 128 },
            ..
        })
    ));
    assert!(decode_vec(&q8, &small(), Some(Codec::Q8 { block: 128 })).is_ok());
}

#[test]
fn bad_block_size() {
    for block in [0, MAX_Q8_BLOCK + 1] {
        let codec = Codec::Q8 { block };
        let e = encode(&small(), codec, io::sink()).unwrap_err();
        assert!(
            matches!(e, DeltaError::BadBlockSize { block: b } if b == block),
            "{e}"
        );
        assert!(matches!(
            roundtrip(codec, &small()),
            Err(DeltaError::BadBlockSize { .. })
        ));
        let bytes = header(3, Some(block), 2, &[]);
        assert!(matches!(
            decode_vec(&bytes, &small(), None),
            Err(DeltaError::BadBlockSize { block: b }) if b == block
        ));
    }
    assert!(matches!(
        "q8:0".parse::<Codec>(),
        Err(DeltaError::BadBlockSize { block: 0 })
    ));
}

#[test]
fn unknown_codec_name() {
    for name in ["", "q4", "F32", "q8:", "q8:-1", "q8:x"] {
        assert!(
            matches!(name.parse::<Codec>(), Err(DeltaError::UnknownCodecName(ref n)) if n == name),
            "{name}"
        );
    }
}

#[test]
fn tensor_count_differs_from_base() {
    let bytes = encode_vec(&small(), Codec::F32);
    let bigger = model(&[
        ("a", &[3], vec![0.0; 3]),
        ("b", &[2, 2], vec![0.0; 4]),
        ("c", &[1], vec![0.0]),
    ]);
    assert!(matches!(
        decode_vec(&bytes, &bigger, None),
        Err(DeltaError::TensorCountMismatch {
            expected: 3,
            found: 2
        })
    ));
}

#[test]
fn tensor_name_differs_from_base() {
    let bytes = encode_vec(&small(), Codec::F32);
    let renamed = model(&[("a", &[3], vec![0.0; 3]), ("bb", &[2, 2], vec![0.0; 4])]);
    assert!(matches!(
        decode_vec(&bytes, &renamed, None),
        Err(DeltaError::TensorNameMismatch { index: 1, ref expected, ref found })
            if expected == "bb" && found == "b"
    ));
}

#[test]
fn tensor_shape_differs_from_base() {
    let bytes = encode_vec(&small(), Codec::F32);
    let reshaped = model(&[("a", &[3], vec![0.0; 3]), ("b", &[4], vec![0.0; 4])]);
    assert!(matches!(
        decode_vec(&bytes, &reshaped, None),
        Err(DeltaError::ShapeMismatch { ref name, ref expected, ref found })
            if name == "b" && expected == &[4] && found == &[2, 2]
    ));
}

#[test]
fn header_limits_are_enforced_before_anything_is_allocated() {
    let base = model(&[("a", &[1], vec![0.0])]);
    let limit = |bytes: Vec<u8>, what: &str| {
        let e = decode_vec(&bytes, &base, None).unwrap_err();
        assert!(
            matches!(e, DeltaError::LimitExceeded { what: w, .. } if w == what),
            "{e}"
        );
    };
    limit(header(1, None, u32::MAX, &[]), "tensors");
    limit(
        header(1, None, 1, &[(&[b'a'; 5000], &[1])]),
        "bytes in a tensor name",
    );
    limit(
        header(1, None, 1, &[(b"a", &[1; 9])]),
        "dimensions in a tensor",
    );
    limit(
        header(1, None, 1, &[(b"a", &[1 << 40])]),
        "values along one dimension",
    );
    limit(header(1, None, 1, &[(b"a", &[1 << 32, 2])]), "values");
    let long_name = "n".repeat(MAX_NAME_LEN + 1);
    let too_long = model(&[(long_name.as_str(), &[1], vec![0.0])]);
    assert!(matches!(
        encode(&too_long, Codec::F32, io::sink()),
        Err(DeltaError::LimitExceeded {
            found: 1025,
            limit: 1024,
            ..
        })
    ));
    let too_deep = model(&[("a", &[1; 9], vec![0.0])]);
    assert!(matches!(
        roundtrip(Codec::F16, &too_deep),
        Err(DeltaError::LimitExceeded {
            found: 9,
            limit: 8,
            ..
        })
    ));
}

#[test]
fn truncated_at_every_cut_point() {
    for codec in ALL_CODECS {
        let bytes = encode_vec(&small(), codec);
        let codec_known = if matches!(codec, Codec::Q8 { .. }) {
            15
        } else {
            11
        };
        for cut in 0..bytes.len() {
            let e = decode_vec(&bytes[..cut], &small(), None).unwrap_err();
            let DeltaError::Truncated { got, expected } = e else {
                panic!("{codec} cut at {cut}: {e}");
            };
            assert_eq!(got, cut as u64);
            if cut >= codec_known {
                assert_eq!(expected, bytes.len() as u64, "{codec} cut at {cut}");
            } else {
                assert!(expected > got);
            }
        }
    }
}

#[test]
fn trailing_bytes_after_the_checksum() {
    let mut bytes = encode_vec(&small(), Codec::F16);
    let len = bytes.len() as u64;
    bytes.push(0);
    assert!(matches!(
        decode_vec(&bytes, &small(), None),
        Err(DeltaError::TrailingBytes { after }) if after == len
    ));
}

#[test]
fn non_finite_values_are_refused() {
    let nan = f32::NAN.to_le_bytes();
    assert!(matches!(
        tampered(Codec::F32, 4, &nan),
        Err(DeltaError::NonFinite { ref name, index: 1 }) if name == "a"
    ));
    let inf = 0x7c00u16.to_le_bytes(); // f16 +infinity
    assert!(matches!(
        tampered(Codec::F16, 3 * 2 + 2 * 2, &inf),
        Err(DeltaError::NonFinite { ref name, index: 2 }) if name == "b"
    ));
    for codec in ALL_CODECS {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let m = model(&[(
                "w",
                &[300],
                (0..300).map(|i| if i == 290 { bad } else { 0.1 }).collect(),
            )]);
            assert!(
                matches!(
                    encode(&m, codec, io::sink()),
                    Err(DeltaError::NonFinite { index: 290, .. })
                ),
                "{codec} {bad}"
            );
            assert!(matches!(
                roundtrip(codec, &m),
                Err(DeltaError::NonFinite { index: 290, .. })
            ));
        }
    }
}

#[test]
fn bad_q8_scale() {
    // Tensor `a` with block 2: scale, 2 codes, then block 1's scale at payload offset 6.
    for scale in [-1.0f32, -0.0, f32::NAN, f32::INFINITY] {
        let e = tampered(Q8_2, 6, &scale.to_le_bytes()).unwrap_err();
        assert!(
            matches!(e, DeltaError::BadScale { ref name, block: 1, .. } if name == "a"),
            "{scale}: {e}"
        );
    }
}

#[test]
fn q8_code_minus_128() {
    assert!(matches!(
        tampered(Q8_2, 5, &[0x80]),
        Err(DeltaError::Q8CodeOutOfRange { ref name, index: 1 }) if name == "a"
    ));
}

#[test]
fn checksum_mismatch() {
    let mut bytes = encode_vec(&small(), Codec::F32);
    bytes[payload_start(Codec::F32)] ^= 1; // 1.0 becomes 1.0000001: still a valid value
    assert!(matches!(
        decode_vec(&bytes, &small(), None),
        Err(DeltaError::ChecksumMismatch)
    ));
    let mut bytes = encode_vec(&small(), Q8_2);
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    assert!(matches!(
        decode_vec(&bytes, &small(), None),
        Err(DeltaError::ChecksumMismatch)
    ));
}

struct Failing<'a>(&'a [u8]);

impl Read for Failing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.0.is_empty() {
            return Err(io::Error::other("connection reset"));
        }
        let n = buf.len().min(self.0.len()).min(5);
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

#[test]
fn io_errors_are_reported() {
    let bytes = encode_vec(&small(), Codec::F32);
    let e = decode_to_model(Failing(&bytes[..30]), &Layout::of(&small()), None).unwrap_err();
    assert!(matches!(e, DeltaError::Io(_)), "{e}");
    assert!(e.to_string().contains("connection reset"));
    struct Full;
    impl io::Write for Full {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::new(io::ErrorKind::StorageFull, "disk full"))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    assert!(matches!(
        encode(&small(), Codec::F32, Full),
        Err(DeltaError::Io(_))
    ));
}

#[test]
fn messages_are_lowercase_unpunctuated_and_say_what_to_do() {
    let s = || "t".to_string();
    let all = [
        DeltaError::MissingTensor { name: s() },
        DeltaError::UnexpectedTensor { name: s() },
        DeltaError::ShapeMismatch {
            name: s(),
            expected: vec![1],
            found: vec![2],
        },
        DeltaError::TensorCountMismatch {
            expected: 1,
            found: 2,
        },
        DeltaError::TensorNameMismatch {
            index: 0,
            expected: s(),
            found: s(),
        },
        DeltaError::NonFinite {
            name: s(),
            index: 0,
        },
        DeltaError::F16OutOfRange {
            name: s(),
            index: 0,
            value: 1e5,
        },
        DeltaError::BadBlockSize { block: 0 },
        DeltaError::UnknownCodecName(s()),
        DeltaError::LimitExceeded {
            what: "tensors",
            found: 2,
            limit: 1,
        },
        DeltaError::BadMagic,
        DeltaError::UnsupportedVersion {
            found: 2,
            supported: 1,
        },
        DeltaError::UnknownCodec(9),
        DeltaError::CodecMismatch {
            expected: Codec::F32,
            found: Codec::F16,
        },
        DeltaError::Truncated {
            got: 1,
            expected: 2,
        },
        DeltaError::TrailingBytes { after: 3 },
        DeltaError::BadScale {
            name: s(),
            block: 0,
            scale: -1.0,
        },
        DeltaError::Q8CodeOutOfRange {
            name: s(),
            index: 0,
        },
        DeltaError::ChecksumMismatch,
        DeltaError::Io(io::Error::other("x")),
    ];
    for e in all {
        let msg = e.to_string();
        assert!(
            msg.starts_with(|c: char| c.is_lowercase() || c == '\''),
            "{msg}"
        );
        assert!(!msg.ends_with('.'), "{msg}");
        assert!(msg.contains("; "), "no advice in: {msg}");
    }
}
